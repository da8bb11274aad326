#!/usr/bin/env bash
# Issue 4, sixth session, first GPU call: the dense prefix through cuDNN (v9). Whether cuDNN's op takes
# grouped heads; the GPU suite's dense-prefix and Hopper-backward cases; the prefix on/off A/B probe; and
# `moba bench` at the paper preset, 128K x 8 heads, with the prefix (the default).
# Outputs in $OUT/p9/, packed into $OUT/p9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup p9
TAILN=3 step cudnn_gqa 60 env OUT="$DIR" python scripts/v9_prefix_probe.py --gqa
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=6 step gpu_tests 170 python -m pytest -q -m gpu tests/test_gpu_suite.py -k "dense_prefix or hopper_backward"
TAILN=12 step ab 200 env OUT="$DIR" python scripts/v9_prefix_probe.py
STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step paper_128k_h8 100 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8"
pack
