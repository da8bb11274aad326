#!/usr/bin/env bash
# v10, calls of up to 524288 rows (128 shapes): the GPU suite's long-block cases, `moba bench --preset 10m`
# twice, and the blocks probe at 10M only (fresh inputs). Outputs in $OUT/v10t/, packed into $OUT/v10t.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v10t
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py -k long_block
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m2 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m2"
OUT="$OUT/v10t" step probe 120 python scripts/v10_blocks_probe.py 2m-c32768-k4-h4
tail -n 1 "$DIR/probe.log" | cut -c1-700
pack
