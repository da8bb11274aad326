#!/usr/bin/env bash
# Issue 4, sixth session, sixth GPU call: the GPU suite with the Gluon backward taking fp16 too (two fp16
# cases against the Triton kernel and the float32 reference). Outputs in $OUT/f9/, packed into $OUT/f9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup f9
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=6 step gpu_suite 240 python -m pytest -q -m gpu tests/test_gpu_suite.py
pack
