#!/usr/bin/env bash
# Issue 4, fourth session, last GPU call: correctness of kernel v7 as committed (L2 prefetch on): the GPU
# suite, the op's tests and the decode tests on the H200, and `moba compare` with its CUDA defaults.
# Outputs in $OUT/c7/, packed into $OUT/c7.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup c7
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
step op_tests 200 python -m pytest -q tests/test_triton_moba.py tests/test_decode.py
step compare_default 90 python -m moba_cli compare --out "$DIR/compare_default.json"
pack
