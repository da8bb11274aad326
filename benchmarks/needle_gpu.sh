#!/usr/bin/env bash
# The needle-small pair on one GPU, time-boxed, then `moba eval` on both checkpoints (issues 17 and 18).
#
#   OUT=/tmp/o DATA=DIR bash benchmarks/needle_gpu.sh
#
# DATA: a `moba data build` folder with retrieval documents (benchmarks/train_gpu.sh's mixture, say).
# Each kind (moba, full) trains recipes/needle-small.yaml for STEPS steps under a LIMIT-second time limit,
# with a checkpoint every CKPT_EVERY steps, so a run cut short by the limit still leaves a model (its
# result.json is then missing and the log says so). Then benchmarks/eval_gpu.sh runs on each newest
# checkpoint: EVAL_MOBA (default all: needle, loss, RULER) on the MoBA-trained model, EVAL_FULL (default
# needle) on the full-attention one, both with --attn both. The eval_gpu.sh knobs (NEEDLE_LENGTHS, ...)
# pass through. KINDS (default "moba full") picks the trainings; EVAL=none skips the evals (run them later
# with benchmarks/eval_gpu.sh on $WORK/<kind>/checkpoints/<step>). MODEL_OUT=DIR also writes each kind's
# newest checkpoint without its optimizer state, as DIR/<kind>.tgz.part-aa, -ab, ... (15 MiB pieces: the
# device returns files of at most 16 MiB, 8 in all: a 10M model takes 4; `cat <kind>.tgz.part-* | tar xz`
# puts it back). Writes under $OUT: train-{moba,full}/{metrics.jsonl,result.json,recipe.yaml},
# evals-{moba,full}/<step>/..., log.txt. SET: more `--set key=value` words for both trainings.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moba-needle-out}
WORK=${WORK:-/tmp/moba-needle-work}
DATA=${DATA:?DATA must name a moba data build folder}
STEPS=${STEPS:-400}
LIMIT=${LIMIT:-180}
CKPT_EVERY=${CKPT_EVERY:-100}
KINDS=${KINDS:-moba full}
EVAL=${EVAL:-}
read -r -a MORE <<< "${SET:-}"
mkdir -p "$OUT" "$WORK"
export MOBA_GIT_COMMIT=${MOBA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/log.txt"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

for kind in $KINDS; do
  t0=$SECONDS
  COLUMNS=120 timeout "$LIMIT" python -m moba_cli train recipes/needle-small.yaml --set name="needle-$kind" \
    --set attention.kind=$kind --set data.path="$DATA" --set log.out="$WORK/$kind" --set train.steps="$STEPS" \
    --set checkpoint.every="$CKPT_EVERY" --set eval.every="$CKPT_EVERY" --set log.progress=false \
    --set optim.warmup_steps=$((STEPS / 10)) "${MORE[@]}" >>"$LOG" 2>&1
  say "train $kind rc=$? in $((SECONDS - t0)) s"
  mkdir -p "$OUT/train-$kind"
  cp "$WORK/$kind"/{metrics.jsonl,result.json,recipe.yaml} "$OUT/train-$kind/" 2>/dev/null
done

if [ -n "${MODEL_OUT:-}" ]; then
  mkdir -p "$MODEL_OUT"
  for kind in $KINDS; do
    pointer="$WORK/$kind/checkpoints/latest"
    [ -f "$pointer" ] || continue
    tar cz -C "$WORK/$kind/checkpoints/$(cat "$pointer")" --exclude=trainer.pt --exclude='rank-*.pt' . |
      split -b 15M - "$MODEL_OUT/$kind.tgz.part-"
    say "model $kind: $(du -sh "$MODEL_OUT" | cut -f1) in $MODEL_OUT"
  done
fi
[ "$EVAL" = none ] && exit 0
for kind in $KINDS; do
  pointer="$WORK/$kind/checkpoints/latest"
  [ -f "$pointer" ] || { say "no checkpoint for $kind"; continue; }
  step=EVAL_${kind^^}
  step=${!step:-$([ $kind = moba ] && echo all || echo needle)}
  t0=$SECONDS
  OUT="$OUT/evals-$kind" bash benchmarks/eval_gpu.sh "$WORK/$kind/checkpoints/$(cat "$pointer")" "$step" >>"$LOG" 2>&1
  say "eval $kind ($step) rc=$? in $((SECONDS - t0)) s"
done
