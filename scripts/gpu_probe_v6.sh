#!/usr/bin/env bash
# Issue 4, third session, first GPU call: kernel v6 (grouped gate with scratch-held kept scores,
# persistent; backward with dQ fused into the dK/dV kernel) on CUDA: kernel tests, GPU suite, then the
# gate and backward probe. Outputs in $OUT/p6/, packed into $OUT/p6.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p6
step triton_tests 200 python -m pytest -q -x tests/test_triton_moba.py
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 200 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=60 step probe 330 env OUT="$DIR" python scripts/gate_bwd_probe.py
pack
