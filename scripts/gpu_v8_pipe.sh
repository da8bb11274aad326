#!/usr/bin/env bash
# Issue 4, fifth session, ninth GPU call: the Gluon backward with each tile's dV/dK/dQ^T products left
# running into the next tile (MOBA_GLUON_PIPE=1) against the committed one, then `moba bench` at 128K x 8
# heads and 1M x 1 head with it. Outputs in $OUT/p8/, packed into $OUT/p8.tgz. Ran at 6c7fa30; the
# variant gave a wrong dQ and was removed at the next commit (docs/perf-notes.md, v8 rows).
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p8
STEP_GREP= TAILN=4 step probe 110 env OUT="$DIR" python scripts/v8_bwd_probe.py --pipe
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=8
step pipe_128k_h8 70 env MOBA_GLUON_PIPE=1 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/pipe_128k_h8"
step pipe_1m_h1 60 env MOBA_GLUON_PIPE=1 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/pipe_1m_h1"
pack
