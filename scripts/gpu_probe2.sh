#!/usr/bin/env bash
# Issue 4, second session: GPU checks of the grouped gate and the TMA forward (exactness first: the GPU
# suite and the kernel tests on CUDA), then scripts/gate_fwd_probe.py. Outputs in $OUT/p2/, packed
# into $OUT/p2.tgz. About 6 minutes on an H200. Pass MOBA_GIT_COMMIT=$(git rev-parse HEAD).
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p2
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
step triton_tests 150 python -m pytest -q -x tests/test_triton_moba.py
TAILN=40 step probe 330 env OUT="$DIR" python scripts/gate_fwd_probe.py
pack
