#!/usr/bin/env bash
# Issue 4, fourth session, third GPU call (kernel v7 with lazy rescaling in the forward): GPU suite; probe
# (attention with lazy rescaling on/off, sort-gate launch configs at 1M x 8 heads); `moba bench` paper 1M
# (1 and 8 heads), 128K (8 heads), 10M; if a sort-gate config beats the default by more than 5%, the 1M x
# 8 heads forward again with it (MOBA_GATE_CFG, printed). Outputs in $OUT/l7/, packed into $OUT/l7.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup l7
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
STEP_GREP= TAILN=12 step lazy_gate 200 env OUT="$DIR" python scripts/v7_probe.py --lazy-gate
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step paper_1m_h1 110 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_1m_h8 200 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8"
step paper_128k_h8 90 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
step ten_m 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
BEST=$(python - "$DIR/v7_lazy_gate.json" <<'PY'
import json, sys
recs = [r for r in json.load(open(sys.argv[1]))["records"] if r["what"] == "sort_gate_cfg" and r.get("same_selection")]
base = next(r["ms"] for r in recs if r["cfg"] == "")
best = min(recs, key=lambda r: r["ms"])
print(best["cfg"] if best["cfg"] and best["ms"] < 0.95 * base else "")
PY
)
echo "best sort-gate config: '${BEST}'"
if [ -n "$BEST" ]; then
  MOBA_GATE_CFG=$BEST step paper_1m_h8_gate 120 python -m moba_cli bench --preset paper --heads 8 --seq 1m --pass fwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 6 --out "$DIR/paper_1m_h8_gate"
fi
pack
