#!/usr/bin/env bash
# Issue 4, sixth session, second GPU call: the dense prefix with grouped heads through cuDNN, and its
# forward on a second stream. The GPU suite's dense-prefix cases (now with GQA); the A/B probe (off / on,
# two streams / on, one stream); `moba bench` at the paper preset, 128K x 8 heads, twice.
# Outputs in $OUT/s9/, packed into $OUT/s9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup s9
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_tests 150 python -m pytest -q -m gpu tests/test_gpu_suite.py -k "dense_prefix"
TAILN=16 step ab 200 env OUT="$DIR" python scripts/v9_prefix_probe.py
for i in 1 2; do
  STEP_GREP="\] .*: (ok|estimated|error|oom)" TAILN=8 step paper_128k_h8_$i 100 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8_$i"
done
pack
