#!/usr/bin/env bash
# Issue 4, sixth session, third GPU call: v9 = dense prefix + per-block backward lists (BwdLists: a key
# tile's queries in two runs, own block then past choosers, instead of one run per slot). The GPU suite;
# `moba bench` at the paper preset, 128K x 8 heads, twice, and 1M x 1 head; the A/B probe at those two.
# Outputs in $OUT/l9/, packed into $OUT/l9.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup l9
MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" TAILN=4 step gpu_suite 170 python -m pytest -q -m gpu tests/test_gpu_suite.py
B="\] .*: (ok|estimated|error|oom)"
for i in 1 2; do
  STEP_GREP=$B TAILN=8 step paper_128k_h8_$i 90 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$DIR/paper_128k_h8_$i"
done
STEP_GREP=$B TAILN=8 step paper_1m_h1 110 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$DIR/paper_1m_h1"
TAILN=12 step ab 90 env OUT="$DIR" python scripts/v9_prefix_probe.py paper-128k-h8 paper-1m-h1
pack
