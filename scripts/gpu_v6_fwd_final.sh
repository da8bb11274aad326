#!/usr/bin/env bash
# Issue 4, third session, final GPU call: 128-key forward tiles (3 stages, TMA) as the default for large
# chunks: GPU suite (its 64K chunk-4096 case runs these tiles), then `moba bench` paper 1M (1 head) and
# 128K (8 heads), fwd and fwd+bwd. Outputs in $OUT/z6/, packed into $OUT/z6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup z6
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h1 100 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_128k_h8 80 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
