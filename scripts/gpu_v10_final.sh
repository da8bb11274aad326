#!/usr/bin/env bash
# v10, final pass: each block's rows padded to a multiple of 4096 and cut into calls of <= 131072 rows (32 shapes). The GPU suite's
# long-block cases, the blocks probe (on/off, fresh inputs) and `moba bench --preset 10m`.
# Outputs in $OUT/v10c/, packed into $OUT/v10c.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v10c
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py -k long_block
OUT="$OUT/v10c" step probe 240 python scripts/v10_blocks_probe.py
tail -n 3 "$DIR/probe.log" | cut -c1-700
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m2 150 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m2"
pack
