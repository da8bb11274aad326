#!/usr/bin/env bash
# Issue 4, second session, third GPU call: the grouped gate after its fixes (float32 max/argmax per
# group, no reordering reshape) on CUDA: kernel tests, GPU suite, then the gate at five shapes against
# the sort gate. Outputs in $OUT/p3/, packed into $OUT/p3.tgz. About 4 minutes on an H200.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p3
step triton_tests 150 python -m pytest -q tests/test_triton_moba.py
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=20 step gates 200 env OUT="$DIR" python scripts/gate_fwd_probe.py --gates
pack
