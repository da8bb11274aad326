#!/usr/bin/env bash
# v11: own blocks split into causal halves plus non-causal calls. The GPU suite's long-block cases (two with split
# own blocks), then the split probe (times per level, the own part alone, 10M kernel breakdown).
# Outputs in $OUT/v11a/, packed into $OUT/v11a.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v11a
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 200 python -m pytest -q -m gpu tests/test_gpu_suite.py -k long_block
OUT="$OUT" step probe 330 python scripts/v11_own_split_probe.py
grep -v breakdown "$DIR/probe.log" | cut -c1-400
pack
