#!/usr/bin/env bash
# The GPU runs left open after the first H200 session (issue 3's missing JSON results, and issue 4's
# unmeasured v4 changes). Each step writes JSON/CSV/PNG under $OUT/r3/<step>/ (partial results survive a
# time limit in <stem>.partial.json); everything is packed into $OUT/r3.tgz. About 8 minutes on an H200.
# Pass the commit in: MOBA_GIT_COMMIT=$(git rev-parse HEAD) (the GPU machine's copy has no .git).
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup r3
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=12
DENSE="--baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 2 --repeats 3"
step paper_h1 150 python -m moba_cli bench --preset paper --heads 1 $DENSE --out "$DIR/paper_h1"
step paper_h8 200 python -m moba_cli bench --preset paper --heads 8 $DENSE --out "$DIR/paper_h8"
step flashmoba_fwd 60 python -m moba_cli bench --preset flashmoba --pass fwd $DENSE --out "$DIR/flashmoba_fwd"
step decode 90 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 32 --repeats 10 --out "$DIR/decode"
step decode_gqa 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 8 --repeats 10 --out "$DIR/decode_gqa"
step decode_mqa 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 1 --repeats 10 --out "$DIR/decode_mqa"
pack
