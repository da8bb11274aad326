#!/usr/bin/env bash
# Issue 4, second session: GPU checks of the grouped gate and the TMA forward (exactness first: the GPU
# suite and the kernel tests on CUDA), then scripts/gate_fwd_probe.py. Outputs in $OUT/p2/, packed
# into $OUT/p2.tgz. About 6 minutes on an H200. Pass MOBA_GIT_COMMIT=$(git rev-parse HEAD).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
OUT=${OUT:-/tmp/moba-gpu-probe2}
P="$OUT/p2"
mkdir -p "$P"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$P/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n "${TAILN:-6}" "$P/$name.log" | cut -c1-300
}
MOBA_GPU_SUITE_OUT="$P/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
step triton_tests 150 python -m pytest -q -x tests/test_triton_moba.py
TAILN=40 step probe 330 env OUT="$P" python scripts/gate_fwd_probe.py
tar czf "$OUT/p2.tgz" -C "$OUT" p2
