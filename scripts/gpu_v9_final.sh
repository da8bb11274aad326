#!/usr/bin/env bash
# Issue 4, sixth session, seventh GPU call: the final v9 commit (the two list builders share one sort
# helper): the GPU suite and `moba bench` at the paper preset, 128K x 8 heads.
# Outputs in $OUT/z9/, packed into $OUT/z9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup z9
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 200 python -m pytest -q -m gpu tests/test_gpu_suite.py
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step paper_128k_h8 90 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
