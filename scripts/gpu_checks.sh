#!/usr/bin/env bash
# One GPU session's worth of end-to-end checks, in the order that unblocks the most: the bench on a
# small paper-preset run, the decode check, the transformers prefill, `moba compare` (default),
# and the decode tests' GPU cases. Everything lands in $OUT/checks/ and is packed into $OUT/checks.tgz.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup checks
TAILN=25
step bench_paper_small 200 python -m moba_cli bench --preset paper --seq 32k,128k --heads 1 --pass fwd,fwd+bwd --repeats 3 --out "$DIR/bench_paper_small"
step decode_check 200 python scripts/gpu_decode_check.py --lengths 128k,1m --iters 10 --out "$DIR/decode"
step hf_prefill 240 python scripts/gpu_hf_prefill.py
step compare_default 90 python -m moba_cli compare --out "$DIR/compare_default.json"
step decode_tests 120 python -m pytest -q tests/test_decode.py
pack
