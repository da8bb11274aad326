#!/usr/bin/env bash
# Issue 4, fifth session, fourth GPU call: the Gluon backward (moba_cli/ops/moba/gluon_bwd.py) against
# the Triton one (times, dK/dV/dQ agreement), then Nsight Compute on the Gluon kernel.
# Outputs in $OUT/g8/, packed into $OUT/g8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup g8
STEP_GREP= TAILN=16 step probe 300 env OUT="$DIR" python scripts/v8_bwd_probe.py --gluon
TAILN=3 step ncu_gluon 150 ncu --clock-control none -k regex:bwd_dkdv --launch-skip 1 --launch-count 1 \
  --set full -f -o /tmp/ncu_gluon python scripts/v8_bwd_probe.py --ncu gluon x
if [ -f /tmp/ncu_gluon.ncu-rep ]; then
  ncu -i /tmp/ncu_gluon.ncu-rep --page details --csv > "$DIR/ncu_gluon_details.csv" 2>&1
  ncu -i /tmp/ncu_gluon.ncu-rep --page source --csv --print-source sass > "$DIR/ncu_gluon_sass.csv" 2>&1
fi
pack
