#!/usr/bin/env bash
# Download the pure-Python wheels `moba eval ruler` needs beyond what the GPU machine has (it has torch,
# transformers, accelerate, pandas, pyarrow, scipy, sacrebleu, tokenizers, ... but no lm-eval or datasets).
# Python 3.12, manylinux x86_64. Run where the network is reachable; the wheels land in .whl/ (ignored by
# git; carry it to the GPU machine). There:
#     pip install --no-deps --no-index --upgrade --target /tmp/moba-pydeps .whl/*.whl && export PYTHONPATH=/tmp/moba-pydeps
# Checked here with: python benchmarks/eval_import_check.py MODEL_DIR (hides everything else).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
WHEELS=(
  lm_eval==0.4.13
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  xxhash==4.1.0
  nltk==3.10.4
  joblib==1.6.0
  wonderwords==3.0.1
)
mkdir -p "$DEST"
for w in "${WHEELS[@]}"; do
  pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "$w"
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
