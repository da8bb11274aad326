#!/usr/bin/env bash
# `moba train` on one GPU (issue 18): training speed and a short needle-small pair. Writes under $OUT:
#   data/summary.json, data/manifest.json   the dataset built from this machine's installed packages
#   speed.json                               tokens/s, MFU, step time, memory: 20M at 8K and 32K and 100M at
#                                            8K, MoBA and full (median over the steps after the first 5);
#                                            full also with full_impl=moba_dense, and with flash-attn's
#                                            varlen kernel when it is installed
#   speed/<run>/{metrics.jsonl,result.json,recipe.yaml}
#   needle/summary.json, needle/points/kind-*/{metrics.jsonl,result.json,recipe.yaml}
#   needle/ckpt-{moba,full}/   the final checkpoints (HF dirs, ~60 MB each) only with KEEP_CKPT=1; else they
#                              stay in $WORK/needle/points/kind-*/checkpoints/latest for `moba eval` there
#   log.txt                                  every command's output
# Run from the repository root:  OUT=/tmp/out bash benchmarks/train_gpu.sh
# The speed stage alone took over 6 min on an H100 at d97d238 (data 86 s, then 35-65 s a run). SPEED_STEPS,
# NEEDLE_STEPS, DATA_TOKENS shorten or lengthen it, STAGES="speed" or "needle" runs one part; the data of
# $WORK/data is reused when present.
# SPEED_ONLY="100M-8k-full 100M-8k-full-dense" runs only the named speed runs; SPEED_SET="--set train.compile=true"
# adds settings to every speed run (runs of one call share them: name the output folder after them).
set -u
OUT=${OUT:-/tmp/moba-train-out}
WORK=${WORK:-/tmp/moba-train-work}
SPEED_STEPS=${SPEED_STEPS:-30}
NEEDLE_STEPS=${NEEDLE_STEPS:-250}
STAGES=${STAGES:-speed needle}
DATA_TOKENS=${DATA_TOKENS:-24m}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/speed" "$OUT/needle" "$OUT/data" "$WORK"
export MOBA_GIT_COMMIT=${MOBA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/log.txt"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

# 1. Data: code of the installed packages + retrieval documents (needle, passkey, kv, vartrack up to 8K).
DATA="$WORK/data"
if [ ! -f "$DATA/manifest.json" ]; then
  cat > "$WORK/data.yaml" <<EOF
sources:
  - {kind: code, suffixes: [.py], fraction: 0.6}
  - {kind: synthetic, tasks: [needle, passkey, kv, needle, vartrack], lengths: [1k, 2k, 4k, 8k], fraction: 0.4}
vocab_size: 8192
max_tokens: $DATA_TOKENS
tokenizer_bytes: 32m
val_fraction: 0.01
EOF
  t0=$SECONDS
  COLUMNS=120 timeout 240 python -m moba_cli data build --config "$WORK/data.yaml" --out "$DATA" \
    --result "$OUT/data/summary.json" >>"$LOG" 2>&1
  say "data build rc=$? in $((SECONDS - t0)) s"
fi
cp "$DATA/manifest.json" "$OUT/data/" 2>/dev/null || { say "no data; stopping"; exit 1; }

# 2. Speed: a few dozen steps per case, no checkpoint, one validation batch at the end.
speed() {  # name size seq chunk kind micro [more --set ...]
  local name=$1 size=$2 seq=$3 chunk=$4 kind=$5 micro=$6 rows
  shift 6
  [ -n "${SPEED_ONLY:-}" ] && [[ " $SPEED_ONLY " != *" $name "* ]] && return 0
  read -r -a extra <<< "${SPEED_SET:-}"
  rows=$((131072 / seq))  # 128K tokens a step at every length
  t0=$SECONDS
  COLUMNS=120 timeout 150 python -m moba_cli train recipes/scaling-tiny.yaml --set name="$name" \
    --set data.path="$DATA" --set log.out="$WORK/speed/$name" --set model.size="$size" \
    --set data.seq_len="$seq" --set attention.chunk="$chunk" --set attention.kind="$kind" \
    --set train.steps="$SPEED_STEPS" --set train.batch_size="$rows" --set train.micro_batch="$micro" \
    --set eval.every=0 --set eval.batches=1 --set checkpoint.every=0 --set checkpoint.final=false \
    --set log.every=1 --set log.progress=false --set optim.warmup_steps=5 "$@" "${extra[@]}" >>"$LOG" 2>&1
  say "speed $name rc=$? in $((SECONDS - t0)) s"
  mkdir -p "$OUT/speed/$name"
  cp "$WORK/speed/$name"/{metrics.jsonl,result.json,recipe.yaml} "$OUT/speed/$name/" 2>/dev/null
}
if [[ " $STAGES " == *" speed "* ]]; then
rm -rf "$WORK/speed"
speed 20M-8k-moba 20M 8192 512 moba 8
speed 20M-8k-full 20M 8192 512 full 8
speed 20M-32k-moba 20M 32768 2048 moba 2
speed 20M-32k-full 20M 32768 2048 full 2
speed 100M-8k-moba 100M 8192 512 moba 4
speed 100M-8k-full 100M 8192 512 full 4
# Full attention's default is SDPA with a packed block-diagonal mask (no flash/cuDNN kernel takes a mask
# tensor); moba_dense runs this project's full_attention, cuDNN first, one call per packed document, and
# flash-attn's variable-length kernel (when installed) is the other strong baseline for such rows.
speed 20M-32k-full-dense 20M 32768 2048 full 2 --set attention.full_impl=moba_dense
speed 100M-8k-full-dense 100M 8192 512 full 4 --set attention.full_impl=moba_dense
if python -c "import flash_attn" 2>/dev/null; then
  speed 20M-32k-full-fa2 20M 32768 2048 full 2 --set attention.full_impl=flash_attention_2
  speed 100M-8k-full-fa2 100M 8192 512 full 4 --set attention.full_impl=flash_attention_2
else
  say "flash-attn not installed: full attention measured with SDPA only"
fi
python - "$OUT" <<'PY' | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for run in sorted((out / "speed").iterdir()):
    m = run / "metrics.jsonl"
    if not m.is_file():
        rows.append({"run": run.name, "error": "no metrics (see log.txt)"})
        continue
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    steady = [x for x in lines if x["step"] > 5] or lines
    res = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    cfg = res.get("config", {})
    rows.append({"run": run.name, "size": cfg.get("model", {}).get("size"),
                 "seq_len": cfg.get("data", {}).get("seq_len"), "attn": cfg.get("attention", {}).get("kind"),
                 "full_impl": cfg.get("attention", {}).get("full_impl"), "steps": len(lines),
                 "tokens_per_s": statistics.median(x["tokens_per_s"] for x in steady),
                 "step_s": statistics.median(x["step_s"] for x in steady),
                 "mfu": statistics.median(x["mfu"] for x in steady) if steady[0].get("mfu") is not None else None,
                 "peak_memory_gb": max(x["peak_memory_gb"] or 0 for x in lines),
                 "final_loss": lines[-1]["loss"], "params": res.get("summary", {}).get("params"),
                 "gpu": res.get("env", {}).get("gpu")})
(out / "speed.json").write_text(json.dumps({"records": rows}, indent=2))
for r in rows:
    print(r)
PY
fi

# 3. needle-small, short: MoBA and full on the same data (checkpoints for `moba eval needle`).
[[ " $STAGES " == *" needle "* ]] || exit 0
t0=$SECONDS
COLUMNS=120 timeout 300 python -m moba_cli sweep recipes/needle-small.yaml --out "$WORK/needle" \
  --set data.path="$DATA" --set train.steps="$NEEDLE_STEPS" --set eval.every=100 --set checkpoint.every=0 \
  --set log.progress=false --set optim.warmup_steps=30 >>"$LOG" 2>&1
say "needle sweep rc=$? in $((SECONDS - t0)) s"
cp "$WORK/needle/summary.json" "$WORK/needle"/*.png "$OUT/needle/" 2>/dev/null
for p in "$WORK/needle/points"/*/; do
  name=$(basename "$p"); mkdir -p "$OUT/needle/points/$name"
  cp "$p"/{metrics.jsonl,result.json,recipe.yaml} "$OUT/needle/points/$name/" 2>/dev/null
  if [ "${KEEP_CKPT:-0}" = 1 ] && [ -f "$p/checkpoints/latest" ]; then
    ck="$p/checkpoints/$(cat "$p/checkpoints/latest")"
    mkdir -p "$OUT/needle/ckpt-${name#kind-}"
    cp "$ck"/*.json "$ck"/*.safetensors "$OUT/needle/ckpt-${name#kind-}/" 2>/dev/null
  fi
done
say "done; needle checkpoints in $WORK/needle/points/*/checkpoints/"
