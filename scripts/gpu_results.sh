#!/usr/bin/env bash
# The runs whose results are committed under results/ (one H200 session): GPU suite, transformers 128K
# prefill, and `moba bench` for the paper / flashmoba / 10m presets and the GQA case. Each step has its
# own time limit so one slow step cannot starve the others. Output: $OUT/r/ packed into $OUT/r.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup r
STEP_GREP="passed|failed|error|SOME|wrote|x cuDNN|moba-triton|sdpa-cudnn"
TAILN=14
DENSE="--baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 2 --repeats 3"
step gpu_suite 80 env MOBA_GPU_SUITE_OUT="$DIR/gpu-suite.json" python -m pytest -m gpu -q tests/test_gpu_suite.py
step hf_prefill 90 env OUT="$DIR" python scripts/gpu_hf_prefill.py
step bench_paper_h1 90 python -m moba_cli bench --preset paper --heads 1 $DENSE --out "$DIR/bench_paper_h1"
step bench_paper_h8 120 python -m moba_cli bench --preset paper --heads 8 $DENSE --out "$DIR/bench_paper_h8"
step bench_flashmoba 80 python -m moba_cli bench --preset flashmoba $DENSE --out "$DIR/bench_flashmoba"
step bench_gqa 35 python -m moba_cli bench --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd $DENSE --out "$DIR/bench_gqa"
step bench_10m 60 python -m moba_cli bench --preset 10m $DENSE --out "$DIR/bench_10m"
step compare_default 20 python -m moba_cli compare --out "$DIR/compare_default.json"
pack
