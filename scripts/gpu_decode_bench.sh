#!/usr/bin/env bash
# Decode without the host-side length check (check_lengths=False, as the transformers integration now
# calls it): decode tests on CUDA, then `moba bench --pass decode` at 128K and 1M for MHA, GQA 32/8 and
# MQA. Outputs in $OUT/d2/, packed into $OUT/d2.tgz. About 2 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
OUT=${OUT:-/tmp/moba-gpu-decode2}
R="$OUT/d2"
mkdir -p "$R"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  grep -E "\] .*(moba-triton|sdpa-cudnn): (ok|estimated|error|oom)|passed|failed" "$R/$name.log" | tail -n 8 | cut -c1-150
}
step decode_tests 120 python -m pytest -q tests/test_decode.py
for kv in 32 8 1; do
  step decode_kv$kv 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads $kv --repeats 10 --out "$R/decode_kv$kv"
done
tar czf "$OUT/d2.tgz" -C "$OUT" d2
