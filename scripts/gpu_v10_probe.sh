#!/usr/bin/env bash
# v10: cuDNN gather-path probe (scripts/v10_cudnn_probe.py) on the H200.
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup v10
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$DIR/gpu.txt" 2>&1
step probe 560 python scripts/v10_cudnn_probe.py "$@"
cat "$DIR/probe.log" | cut -c1-400 | tail -40
pack
