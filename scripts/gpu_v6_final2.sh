#!/usr/bin/env bash
# Issue 4, third session, third GPU call: kernel v6 with the fused backward as the default (128-key tiles,
# 8 warps): GPU suite (bf16 grads against float32), the backward probe (fused default against the
# separate dQ pass and one other stage count), then `moba bench` at the targets' shapes with the defaults:
# flashmoba 512K, paper 1M (1 head), paper 128K (8 heads). Outputs in $OUT/g6/, packed into $OUT/g6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup g6
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=12 step bwd_probe 150 env OUT="$DIR" python scripts/gate_bwd_probe.py --bwd-only
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step flashmoba_512k 120 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
step paper_1m_h1 100 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_128k_h8 80 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
