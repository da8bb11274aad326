#!/usr/bin/env bash
# Decode without the host-side length check (check_lengths=False, as the transformers integration now
# calls it): decode tests on CUDA, then `moba bench --pass decode` at 128K and 1M for MHA, GQA 32/8 and
# MQA. Outputs in $OUT/d2/, packed into $OUT/d2.tgz. About 2 minutes on an H200.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup d2
STEP_GREP="\] .*(moba-triton|sdpa-cudnn): (ok|estimated|error|oom)|passed|failed"
TAILN=8
step decode_tests 120 python -m pytest -q tests/test_decode.py
for kv in 32 8 1; do
  step decode_kv$kv 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads $kv --repeats 10 --out "$DIR/decode_kv$kv"
done
pack
