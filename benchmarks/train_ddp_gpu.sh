#!/usr/bin/env bash
# `moba train` on 2 GPUs (torchrun, DDP) against the same run on 1 GPU (issue 18: "the same loss curve
# within noise and throughput scaling"). Needs a 2-GPU machine. Writes under $OUT:
#   one/ and two/{metrics.jsonl,result.json,recipe.yaml}, ddp.json (loss difference per step, tokens/s of
#   each, scaling = two/one), log.txt. About 3-4 min on 2 H100s (data build included).
# Run from the repository root:  OUT=/tmp/out bash benchmarks/train_ddp_gpu.sh
set -u
OUT=${OUT:-/tmp/moba-ddp-out}
WORK=${WORK:-/tmp/moba-train-work}
STEPS=${STEPS:-60}
cd "$(dirname "$0")/.."
mkdir -p "$OUT" "$WORK"
export MOBA_GIT_COMMIT=${MOBA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/log.txt"
DATA="$WORK/data"
if [ ! -f "$DATA/manifest.json" ]; then
  COLUMNS=120 timeout 240 python -m moba_cli data build --source code --vocab 8192 --max-tokens 16m \
    --out "$DATA" --result "$OUT/data.json" >>"$LOG" 2>&1 || { echo "data build failed"; exit 1; }
fi
common=(--set data.path="$DATA" --set model.size=20M --set train.steps="$STEPS" --set train.batch_size=16
        --set train.micro_batch=4 --set eval.every=20 --set eval.batches=2 --set checkpoint.every=0
        --set checkpoint.final=false --set log.every=1 --set log.progress=false --set optim.warmup_steps=10)
rm -rf "$WORK/ddp-one" "$WORK/ddp-two"
COLUMNS=120 python -m moba_cli train recipes/scaling-tiny.yaml "${common[@]}" --set log.out="$WORK/ddp-one" \
  >>"$LOG" 2>&1; echo "one GPU rc=$?"
COLUMNS=120 python -m moba_cli train recipes/scaling-tiny.yaml "${common[@]}" --set log.out="$WORK/ddp-two" \
  --set distributed.gpus=2 >>"$LOG" 2>&1; echo "two GPUs rc=$?"
for r in one two; do mkdir -p "$OUT/$r"; cp "$WORK/ddp-$r"/{metrics.jsonl,result.json,recipe.yaml} "$OUT/$r/" 2>/dev/null; done
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
m = {r: [json.loads(x) for x in (out / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")}
diff = [abs(a["loss"] - b["loss"]) for a, b in zip(m["one"], m["two"])]
tps = {r: statistics.median(x["tokens_per_s"] for x in m[r] if x["step"] > 5) for r in m}
val = {r: [x["val_loss"] for x in m[r] if "val_loss" in x] for r in m}
res = {"steps": len(diff), "max_abs_loss_diff": max(diff), "mean_abs_loss_diff": sum(diff) / len(diff),
       "final_loss": {r: m[r][-1]["loss"] for r in m}, "val_loss": val, "tokens_per_s": tps,
       "scaling": tps["two"] / tps["one"]}
(out / "ddp.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
PY
