#!/usr/bin/env bash
# Issue 4, third session, last GPU call: forward tile configs at paper 1M (attention alone, TMA on); if one
# beats the default by more than 3%, `moba bench` paper 1M (fwd) with it (MOBA_FWD_CFG, printed).
# Outputs in $OUT/w6/, packed into $OUT/w6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup w6
TAILN=12 step fwd_sweep 150 env OUT="$DIR" python scripts/gate_fwd_probe.py --fwd-sweep
BEST=$(python - "$DIR/fwd_sweep.json" <<'PY'
import json, sys
recs = [r for r in json.load(open(sys.argv[1]))["records"] if r["what"] == "attn_fwd" and "ms" in r]
base = next(r["ms"] for r in recs if r["cfg"] == "")
best = min(recs, key=lambda r: r["ms"])
print(best["cfg"] if best["cfg"] and best["ms"] < 0.97 * base else "")
PY
)
echo "best forward config: '${BEST}'"
if [ -n "$BEST" ]; then
  STEP_GREP="\] .*: (ok|estimated|error|oom)"
  TAILN=16
  MOBA_FWD_CFG=$BEST step paper_1m_h1 100 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
fi
pack
