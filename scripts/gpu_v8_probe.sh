#!/usr/bin/env bash
# Issue 4, fifth session, first GPU call: the fused backward with the gathered rows' indices loaded one
# tile ahead (scripts/v8_bwd_probe.py), then Nsight Compute on the committed backward and the variant
# (paper preset, 256K, 1 head) where the machine's runtime lets ncu read the counters.
# Outputs in $OUT/b8/, packed into $OUT/b8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup b8
STEP_GREP= TAILN=12 step probe 330 env OUT="$DIR" python scripts/v8_bwd_probe.py
for v in "base 64,128,8,2" "tpf 64,128,8,3"; do
  set -- $v
  TAILN=3 step "ncu_$1" 150 ncu --clock-control none -k regex:_bwd_dkdv --launch-skip 1 --launch-count 1 \
    --set full -f -o "/tmp/ncu_$1" python scripts/v8_bwd_probe.py --ncu "$1" "$2"
  if [ -f "/tmp/ncu_$1.ncu-rep" ]; then
    ncu -i "/tmp/ncu_$1.ncu-rep" --page details --csv > "$DIR/ncu_$1_details.csv" 2>&1
    ncu -i "/tmp/ncu_$1.ncu-rep" --page source --csv --print-source sass > "$DIR/ncu_$1_sass.csv" 2>&1
    ls -la "$DIR"/ncu_$1_*
  fi
done
pack
