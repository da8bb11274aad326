#!/usr/bin/env bash
# Issue 4, fifth session, eighth GPU call: GQA (32 q / 8 kv heads) against MHA (32 heads) at 128K with
# kernel v8 (the Gluon backward), and the op tests again (the sixth call's 180 s limit ended before
# pytest's summary line). Outputs in $OUT/q8/, packed into $OUT/q8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup q8
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step gqa_128k 100 python -m moba_cli bench --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/gqa_128k"
step mha_128k 100 python -m moba_cli bench --preset paper --seq 128k --heads 32 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/mha_128k"
STEP_GREP= TAILN=3 step op_tests 170 python -m pytest -q tests/test_triton_moba.py tests/test_decode.py
pack
