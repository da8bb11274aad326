#!/usr/bin/env bash
# `moba eval` on one GPU: needle (MoBA and full), loss by position and RULER for one model directory.
#
#   benchmarks/eval_gpu.sh MODEL_DIR [needle|loss|ruler|all]
#
# MODEL_DIR: a `moba train` output, a `moba convert` output, or a plain checkpoint (then set MOBA_ARGS to
# "--chunk 512 --topk 3", say). Results (JSON + PNG) go under $OUT (default results/evals/gpu), one folder per
# step. RULER needs lm-eval: where it is missing, the wheels of benchmarks/gpu_wheels.sh (carried in .whl/)
# are installed into /tmp/moba-pydeps first. Environment knobs and their defaults:
#   NEEDLE_LENGTHS=4k,8k,16k,32k DEPTHS=11 SAMPLES=4  LOSS_SEQ=32k BUCKETS=8 DOCS=2
#   RULER_LENGTHS=4k,8k RULER_SAMPLES=8 RULER_TASKS=default RULER_BATCH=8 RULER_TIME_LIMIT=300
# Each step stays within a few minutes on an H100 for a ~1B model at these defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: benchmarks/eval_gpu.sh MODEL_DIR [needle|loss|ruler|all]}
STEP=${2:-all}
OUT=${OUT:-results/evals/gpu}
read -r -a EXTRA <<< "${MOBA_ARGS:-}"
export MOBA_GIT_COMMIT=${MOBA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

if [[ $STEP == needle || $STEP == all ]]; then
  python -m moba_cli eval needle --model "$MODEL" --attn both --lengths "${NEEDLE_LENGTHS:-4k,8k,16k,32k}" \
    --depths "${DEPTHS:-11}" --samples "${SAMPLES:-4}" --out "$OUT/needle" "${EXTRA[@]}"
fi
if [[ $STEP == loss || $STEP == all ]]; then
  python -m moba_cli eval loss --model "$MODEL" --attn both --seq "${LOSS_SEQ:-32k}" --buckets "${BUCKETS:-8}" \
    --docs "${DOCS:-2}" --out "$OUT/loss" "${EXTRA[@]}"
fi
if [[ $STEP == ruler || $STEP == all ]]; then
  if ! python -c "import lm_eval" 2>/dev/null; then
    ls .whl/*.whl > /dev/null || { echo "lm-eval missing and no wheels in .whl/: run benchmarks/gpu_wheels.sh"; exit 1; }
    # --upgrade: a second install into a kept folder otherwise leaves half-replaced packages (seen: dill)
    pip install --quiet --no-deps --no-index --no-compile --upgrade --target /tmp/moba-pydeps .whl/*.whl
    export PYTHONPATH=/tmp/moba-pydeps${PYTHONPATH:+:$PYTHONPATH}
  fi
  python -m moba_cli eval ruler --model "$MODEL" --attn both --lengths "${RULER_LENGTHS:-4k,8k}" \
    --samples "${RULER_SAMPLES:-8}" --tasks "${RULER_TASKS:-default}" --batch-size "${RULER_BATCH:-8}" \
    --time-limit "${RULER_TIME_LIMIT:-300}" --out "$OUT/ruler" "${EXTRA[@]}"
fi
ls -R "$OUT"
