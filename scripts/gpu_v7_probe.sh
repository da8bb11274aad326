#!/usr/bin/env bash
# Issue 4, fourth session, first GPU call (kernel v7: sync-free schedule, cached layout, the own-block slot
# writes the output, scale folded into the softmax's multiply-add): GPU suite, the v7 probe (forward
# stages; backward with atomics, plain stores, no dQ), then `moba bench` paper 1M (1 head) and flashmoba
# 512K. Outputs in $OUT/p7/, packed into $OUT/p7.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p7
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=8 step v7_probe 200 env OUT="$DIR" python scripts/v7_probe.py
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h1 110 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step flashmoba_512k 120 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
pack
