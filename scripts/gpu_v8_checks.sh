#!/usr/bin/env bash
# Issue 4, fifth session, sixth GPU call: with the Gluon backward as the Hopper default, the Gluon and
# Triton backwards at the other presets' shapes (flashmoba 512K x 16 heads, GQA 32/8 at 128K), the GPU
# suite (with the new Gluon-vs-Triton backward test) and the op tests on the H200.
# Outputs in $OUT/c8/, packed into $OUT/c8.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup c8
STEP_GREP= TAILN=16 step probe 240 env OUT="$DIR" python scripts/v8_bwd_probe.py --gluon --more
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 150 python -m pytest -q -m gpu tests/test_gpu_suite.py
TAILN=4 step op_tests 180 python -m pytest -q tests/test_triton_moba.py tests/test_decode.py
pack
