#!/usr/bin/env bash
# One GPU session's worth of end-to-end checks, in the order that unblocks the most: the bench on a
# small paper-preset run, the decode check, the transformers prefill, `moba compare` (default),
# and the decode tests' GPU cases. Everything lands in $OUT/checks/ and is packed into $OUT/checks.tgz.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=140
OUT=${OUT:-/tmp/moba-gpu-checks}
C="$OUT/checks"
mkdir -p "$C"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$C/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n 25 "$C/$name.log"
}
step bench_paper_small 200 python -m moba_cli bench --preset paper --seq 32k,128k --heads 1 --pass fwd,fwd+bwd --repeats 3 --out "$C/bench_paper_small"
step decode_check 200 python scripts/gpu_decode_check.py --lengths 128k,1m --iters 10 --out "$C/decode"
step hf_prefill 240 python scripts/gpu_hf_prefill.py
step compare_default 90 python -m moba_cli compare --out "$C/compare_default.json"
step decode_tests 120 python -m pytest -q tests/test_decode.py
tar czf "$OUT/checks.tgz" -C "$OUT" checks
