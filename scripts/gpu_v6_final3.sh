#!/usr/bin/env bash
# Issue 4, third session, fourth GPU call: the fused backward with two stages at every chunk size (the
# probe's finding), then `moba bench`: flashmoba 512K again, and GQA (32 q / 8 kv heads) against MHA
# (32 heads) at 128K with the paper preset. Outputs in $OUT/h6/, packed into $OUT/h6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup h6
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step flashmoba_512k 120 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
step gqa_128k 150 python -m moba_cli bench --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/gqa_128k"
step mha_128k 150 python -m moba_cli bench --preset paper --seq 128k --heads 32 --kv-heads 32 --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 2 --max-dense-seconds 1 --out "$DIR/mha_128k"
pack
