#!/usr/bin/env bash
# v11, final pass: own blocks of >= 131072 keys halved by default. The GPU suite's long-block cases,
# `moba bench --preset 10m` twice, then the split probe's 10M case (levels 0-3 on one machine start).
# Outputs in $OUT/v11c/, packed into $OUT/v11c.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v11c
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 200 python -m pytest -q -m gpu tests/test_gpu_suite.py -k long_block
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m 170 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m"
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step ten_m2 170 python -m moba_cli bench --preset 10m --baselines sdpa-cudnn --repeats 3 --out "$DIR/ten_m2"
mkdir -p "$DIR/split"
OUT="$DIR/split" step probe 150 python scripts/v11_own_split_probe.py 10m
grep -v breakdown "$DIR/probe.log" | cut -c1-300
pack
