#!/usr/bin/env bash
# v11 regression at the head commit: issue 4's other presets (paper 1M 1 and 8 heads, 128K 8 heads, GQA 128K,
# MHA 32 heads at 128K, 32K top-k covering every block, flashmoba 512K), then the whole GPU suite.
# Outputs in $OUT/v11r/, packed into $OUT/v11r.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v11r
export STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8
B="python -m moba_cli bench --baselines sdpa-cudnn --repeats 3"
step paper_1m_h1 120 $B --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_128k_h8 90 $B --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --out "$DIR/paper_128k_h8"
step flashmoba_512k 90 $B --preset flashmoba --seq 512k --pass fwd,fwd+bwd --max-dense-seconds 2 --out "$DIR/flashmoba_512k"
step paper_32k 60 $B --preset paper --heads 1,8 --seq 32k --pass fwd,fwd+bwd --out "$DIR/paper_32k"
step gqa_128k 90 $B --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd --out "$DIR/gqa_128k"
step mha_128k 90 $B --preset paper --seq 128k --heads 32 --pass fwd,fwd+bwd --out "$DIR/mha_128k"
step paper_1m_h8 100 $B --preset paper --heads 8 --seq 1m --pass fwd --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
unset STEP_GREP
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
pack
