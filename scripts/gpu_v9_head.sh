#!/usr/bin/env bash
# Issue 4, sixth session, eighth GPU call: the head commit (Ampere check and clear error around the cuDNN
# calls, the bench's dense-part note): the GPU suite's dense-prefix cases and `moba bench` at the paper
# preset, 128K x 8 heads, forward (its record's note). Outputs in $OUT/h9/, packed into $OUT/h9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup h9
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_tests 100 python -m pytest -q -m gpu tests/test_gpu_suite.py -k dense_prefix
TAILN=4 step bench_note 70 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8_fwd"
python - "$DIR"/paper_128k_h8_fwd/bench-*.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["records"]:
    print(r["provider"], r["pass"], r["status"], round(r["ms"] or 0, 2), r.get("note"))
PY
pack
