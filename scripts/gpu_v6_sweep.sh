#!/usr/bin/env bash
# Issue 4, third session, fifth GPU call: fused backward tile configs at paper 1M (1 head) and 128K
# (8 heads), backward alone; if one beats the default by more than 3% at 1M, `moba bench` at both shapes
# with it (MOBA_BWD_CFG, printed). Outputs in $OUT/s6/, packed into $OUT/s6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup s6
TAILN=12 step bwd_sweep 240 env OUT="$DIR" python scripts/gate_bwd_probe.py --bwd-sweep
BEST=$(python - "$DIR/bwd_sweep.json" <<'PY'
import json, sys
recs = [r for r in json.load(open(sys.argv[1]))["records"] if r["case"] == "paper-1m" and "ms" in r]
base = next(r["ms"] for r in recs if r["cfg"] == "")
best = min(recs, key=lambda r: r["ms"])
print(best["cfg"] if best["cfg"] and best["ms"] < 0.97 * base else "")
PY
)
echo "best fused backward config: '${BEST}'"
if [ -n "$BEST" ]; then
  export MOBA_BWD_CFG=$BEST
  STEP_GREP="\] .*: (ok|estimated|error|oom)"
  TAILN=16
  step paper_1m_h1 100 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
  step paper_128k_h8 80 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
fi
pack
