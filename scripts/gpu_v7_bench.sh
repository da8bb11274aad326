#!/usr/bin/env bash
# Issue 4, fourth session, second GPU call (kernel v7): `moba bench` paper 1M with 8 heads (cuDNN forward
# measured, fwd+bwd extrapolated), paper 128K with 8 heads, the 10M preset; the forward stages at 1M with
# 8 heads. Outputs in $OUT/b7/, packed into $OUT/b7.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup b7
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h8 200 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
step paper_128k_h8 90 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
step ten_m 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
STEP_GREP= TAILN=4 step stages_h8 120 env OUT="$DIR" python scripts/v7_probe.py --stages-h8
pack
