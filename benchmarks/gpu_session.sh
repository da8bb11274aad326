#!/usr/bin/env bash
# One device-machine call: the forward-memory probe (a base tree in .carry/base against this tree), then
# benchmarks/gpu_suite.sh's steps; everything is packed into $OUT/all.tgz (the device returns few files).
#   benchmarks/gpu_session.sh [gpu_suite.sh steps...]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
dest=$OUT
export OUT=/tmp/moba-session PYTHONUNBUFFERED=1
mkdir -p "$OUT/memory"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
P=benchmarks/fwd_memory_probe.py
for c in paper-1m gqa-128k flashmoba-512k paper-128k-h8; do
  if [ -d .carry/base ]; then
    PYTHONPATH=.carry/base BUDGETS=base timeout 90 python $P "$OUT/memory/base-$c.json" "$c" 2>&1 | tail -n 1
  fi
  PYTHONPATH=. BUDGETS=${BUDGETS:-0.12} timeout 90 python $P "$OUT/memory/new-$c.json" "$c" 2>&1 | tail -n 1
done | tee "$OUT/memory.log" | cut -c1-400
bash benchmarks/gpu_suite.sh "$@"
tar czf "$dest/all.tgz" -C "$OUT" .
