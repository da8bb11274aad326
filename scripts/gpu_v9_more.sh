#!/usr/bin/env bash
# Issue 4, sixth session, fourth GPU call: v9 at the other presets: GQA (32 q / 8 kv heads) against MHA
# (32 heads) at 128K, flashmoba 512K (its prefix, 1K rows, stays in the sparse kernels), paper 1M x 8 heads
# forward+backward. Outputs in $OUT/m9/, packed into $OUT/m9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup m9
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=8
step gqa_128k 100 python -m moba_cli bench --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/gqa_128k"
step mha_128k 100 python -m moba_cli bench --preset paper --seq 128k --heads 32 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/mha_128k"
step flashmoba_512k 110 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
step paper_1m_h8 170 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
pack
