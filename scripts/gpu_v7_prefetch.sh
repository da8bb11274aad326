#!/usr/bin/env bash
# Issue 4, fourth session, fourth GPU call: the forward's L2 prefetch of the partial results each merging
# tile reads at its end (on vs off, attention alone), then `moba bench` paper 1M, 1 head (fwd, fwd+bwd)
# and 8 heads (fwd). Outputs in $OUT/f7/, packed into $OUT/f7.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup f7
STEP_GREP= TAILN=4 step prefetch 150 env OUT="$DIR" python scripts/v7_probe.py --prefetch
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h1 110 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_1m_h8 150 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
pack
