#!/usr/bin/env bash
# v10: the long-block forward on the H200: GPU suite, the blocks probe (on/off, fresh inputs), and
# `moba bench --preset 10m`. Outputs in $OUT/v10b/, packed into $OUT/v10b.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v10b
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=6 step gpu_suite 240 python -m pytest -q -m gpu tests/test_gpu_suite.py
step probe 200 python scripts/v10_blocks_probe.py
tail -n 4 "$DIR/probe.log" | cut -c1-600
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
pack
