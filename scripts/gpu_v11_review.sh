#!/usr/bin/env bash
# After the v11 review (shared merge helper, shared probe helpers): the long-block GPU cases, the tile probe and
# the split probe's 4M case with the 10M kernel breakdown. Outputs in $OUT/v11v/, packed into $OUT/v11v.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v11v
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 200 python -m pytest -q -m gpu tests/test_gpu_suite.py -k long_block
OUT="$DIR" TAILN=3 step tile_probe 120 python scripts/v11_tile_probe.py
OUT="$DIR" TAILN=3 step split_probe 150 python scripts/v11_own_split_probe.py 4m-c65536
grep -v breakdown "$DIR/split_probe.log" | cut -c1-250
pack
