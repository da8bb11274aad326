#!/usr/bin/env bash
# Issue 4, second session, last GPU call: kernel tests on CUDA (the reference's block means are now
# deterministic on CUDA: the tie-rule test), then `moba bench` with the defaults: flashmoba preset
# (64K-512K, fwd and fwd+bwd), paper preset at 1M with 1 head and at 128K with 8 heads.
# Outputs in $OUT/f2/<step>/, packed into $OUT/f2.tgz. About 7 minutes on an H200.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup f2
STEP_GREP="\] .*: (ok|estimated|error|oom)|passed|failed"
TAILN=16
step triton_tests 120 python -m pytest -q tests/test_triton_moba.py
DENSE="--baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 2 --repeats 3"
step flashmoba 260 python -m moba_cli bench --preset flashmoba --pass fwd,fwd+bwd $DENSE --out "$DIR/flashmoba"
step paper_1m_h1 90 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_128k_h8 60 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
