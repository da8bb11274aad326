#!/usr/bin/env bash
# Issue 4, sixth session, fifth GPU call: the op tests on the H200 with v9 (dense prefix, per-block
# backward lists): tests/test_triton_moba.py, tests/test_dense_prefix.py, tests/test_decode.py.
# Outputs in $OUT/o9/, packed into $OUT/o9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup o9
TAILN=6 step op_tests 400 python -m pytest -q tests/test_triton_moba.py tests/test_dense_prefix.py tests/test_decode.py
pack
