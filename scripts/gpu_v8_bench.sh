#!/usr/bin/env bash
# Issue 4, fifth session, seventh GPU call: `moba bench` with kernel v8 (the Gluon backward on Hopper):
# paper 1M x 1 head (fwd, fwd+bwd), 1M x 8 heads (fwd+bwd), 128K x 8 heads (fwd, fwd+bwd), flashmoba 512K
# (fwd, fwd+bwd), and `moba compare` with its defaults. Outputs in $OUT/v8/, packed into $OUT/v8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v8
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h1 110 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_1m_h8 170 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
step paper_128k_h8 80 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
step flashmoba_512k 110 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
STEP_GREP= TAILN=3 step compare_default 60 python -m moba_cli compare --out "$DIR/compare_default.json"
pack
