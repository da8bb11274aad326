#!/usr/bin/env bash
# Issue 4, second session, third GPU call: the grouped gate after its fixes (float32 max/argmax per
# group, no reordering reshape) on CUDA: kernel tests, GPU suite, then the gate at five shapes against
# the sort gate. Outputs in $OUT/p3/, packed into $OUT/p3.tgz. About 4 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
OUT=${OUT:-/tmp/moba-gpu-probe3}
P="$OUT/p3"
mkdir -p "$P"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$P/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n "${TAILN:-4}" "$P/$name.log" | cut -c1-300
}
step triton_tests 150 python -m pytest -q tests/test_triton_moba.py
MOBA_GPU_SUITE_OUT="$P/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=20 step gates 200 env OUT="$P" python scripts/gate_fwd_probe.py --gates
tar czf "$OUT/p3.tgz" -C "$OUT" p3
