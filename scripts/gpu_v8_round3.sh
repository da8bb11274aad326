#!/usr/bin/env bash
# Issue 4, fifth session, third GPU call: on top of the dQ^T product (committed), the order of the dO V^T
# product, the dQ scale applied once, 3 stages, the index prefetch; then Nsight Compute on the committed
# backward. Outputs in $OUT/r8/, packed into $OUT/r8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup r8
STEP_GREP= TAILN=16 step probe 420 env OUT="$DIR" python scripts/v8_bwd_probe.py --round3
TAILN=3 step ncu_base 150 ncu --clock-control none -k regex:_bwd_dkdv --launch-skip 1 --launch-count 1 \
  --set full -f -o /tmp/ncu_base python scripts/v8_bwd_probe.py --ncu base 64,128,8,2
if [ -f /tmp/ncu_base.ncu-rep ]; then
  ncu -i /tmp/ncu_base.ncu-rep --page details --csv > "$DIR/ncu_base_details.csv" 2>&1
  ncu -i /tmp/ncu_base.ncu-rep --page source --csv --print-source sass > "$DIR/ncu_base_sass.csv" 2>&1
fi
pack
