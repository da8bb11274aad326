#!/usr/bin/env bash
# Issue 4, third session, second GPU call: the backward with dQ fused into the dK/dV kernel against the
# separate dQ pass (probe), then `moba bench` at the targets' shapes with the backward the probe found
# faster at paper 1M (MOBA_BWD_FUSED, printed): flashmoba 512K, paper 1M (1 head), paper 128K (8 heads).
# Outputs in $OUT/f6/, packed into $OUT/f6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup f6
TAILN=12 step bwd_probe 200 env OUT="$DIR" python scripts/gate_bwd_probe.py --bwd-only
PICK=$(python - "$DIR/bwd_probe.json" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))["records"]
e2e = [r for r in recs if r["what"] == "moba_e2e" and r["case"] == "paper-1m"]
print(1 if e2e and e2e[0]["fwdbwd_ms_fused1"] < e2e[0]["fwdbwd_ms_fused0"] else 0)
PY
)
echo "MOBA_BWD_FUSED=$PICK"
export MOBA_BWD_FUSED=$PICK
STEP_GREP="\] .*: (ok|estimated|error|oom)"
TAILN=16
step flashmoba_512k 120 python -m moba_cli bench --preset flashmoba --seq 512k --pass fwd,fwd+bwd --baselines sdpa-cudnn --max-dense-seconds 2 --repeats 3 --out "$DIR/flashmoba_512k"
step paper_1m_h1 100 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
step paper_128k_h8 60 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
