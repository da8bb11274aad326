#!/usr/bin/env bash
# v11: cuDNN non-causal rates for the long-block call shapes, sustained (scripts/v11_tile_probe.py).
# Outputs in $OUT/v11b/, packed into $OUT/v11b.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v11b
OUT="$OUT" TAILN=40 step probe 300 python scripts/v11_tile_probe.py
pack
