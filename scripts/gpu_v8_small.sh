#!/usr/bin/env bash
# Issue 4, fifth session, second GPU call: the fused backward with 4-warp programs small enough for two
# per SM (32 query rows x 64 keys), dQ as dS K (mma.sync at 32 rows) or as (K^T dS^T)^T (Hopper MMAs),
# then Nsight Compute on the 4-warp variant. Outputs in $OUT/s8/, packed into $OUT/s8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup s8
STEP_GREP= TAILN=16 step probe 400 env OUT="$DIR" python scripts/v8_bwd_probe.py --small-tiles
TAILN=3 step ncu_dqt 150 ncu --clock-control none -k regex:_bwd_dkdv --launch-skip 1 --launch-count 1 \
  --set full -f -o /tmp/ncu_dqt python scripts/v8_bwd_probe.py --ncu dqt 32,64,4,2
if [ -f /tmp/ncu_dqt.ncu-rep ]; then
  ncu -i /tmp/ncu_dqt.ncu-rep --page details --csv > "$DIR/ncu_dqt_details.csv" 2>&1
  ncu -i /tmp/ncu_dqt.ncu-rep --page source --csv --print-source sass > "$DIR/ncu_dqt_sass.csv" 2>&1
fi
pack
