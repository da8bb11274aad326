#!/usr/bin/env bash
# The GPU runs left open after the first H200 session (issue 3's missing JSON results, and issue 4's
# unmeasured v4 changes). Each step writes JSON/CSV/PNG under $OUT/r3/<step>/ (partial results survive a
# time limit in <stem>.partial.json); everything is packed into $OUT/r3.tgz. About 8 minutes on an H200.
# Pass the commit in: MOBA_GIT_COMMIT=$(git rev-parse HEAD) (the GPU machine's copy has no .git).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
OUT=${OUT:-/tmp/moba-gpu-remaining}
R="$OUT/r3"
mkdir -p "$R"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" --out "$R/$name" >"$R/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  grep -E "\] .*: (ok|estimated|error|oom)" "$R/$name.log" | tail -n 12 | cut -c1-150
}
DENSE="--baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 2 --repeats 3"
step paper_h1 150 python -m moba_cli bench --preset paper --heads 1 $DENSE
step paper_h8 200 python -m moba_cli bench --preset paper --heads 8 $DENSE
step flashmoba_fwd 60 python -m moba_cli bench --preset flashmoba --pass fwd $DENSE
step decode 90 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 32 --repeats 10
step decode_gqa 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 8 --repeats 10
step decode_mqa 60 python -m moba_cli bench --pass decode --seq 128k,1m --heads 32 --kv-heads 1 --repeats 10
tar czf "$OUT/r3.tgz" -C "$OUT" r3
