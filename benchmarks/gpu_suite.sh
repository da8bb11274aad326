#!/usr/bin/env bash
# The GPU check of the project, for the device machine: the GPU test suite (tests/test_gpu_suite.py, kernel
# against the float32 reference at 8K-128K tokens) and `moba bench` at the presets the README reports, each
# step under its own time limit so one slow step cannot starve the others. Everything lands in $OUT
# (default /tmp/moba-gpu): <step>.log, gpu-suite.json, bench/*.json|csv|png, and the probes' JSON.
#
#   benchmarks/gpu_suite.sh                    # suite paper flashmoba: about 4 minutes on an H100/H200
#   benchmarks/gpu_suite.sh suite              # only the test suite
#   benchmarks/gpu_suite.sh paper gqa 10m breakdown sweep decode hf
#
# Steps: suite, paper (1M x 1 head, fwd and fwd+bwd), paper8 (128K x 8 heads), flashmoba (512K x 16 heads),
# gqa (128K, 32 q / 8 kv heads), 10m (the 10M preset, fwd), breakdown (benchmarks/fwd_breakdown.py),
# sweep (benchmarks/kernel_sweep.py), decode (benchmarks/decode_check.py), hf (benchmarks/hf_prefill.py).
# Exit status: 0 when every step passed, else 1.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export OUT=${OUT:-/tmp/moba-gpu} PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
export MOBA_GIT_COMMIT=${MOBA_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
failed=0

step() {  # step NAME LIMIT_SECONDS CMD...: run CMD with its output in $OUT/NAME.log, print status and tail
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  grep -E "passed|failed|error|wrote|: (ok|estimated|oom)" "$OUT/$name.log" | tail -n 12 | cut -c1-300
  [ "$rc" -eq 0 ] || failed=1
}

BENCH="python -m moba_cli bench --baselines sdpa-cudnn --repeats 3 --out $OUT/bench"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(suite paper flashmoba)
for s in "${steps[@]}"; do
  case $s in
    suite) step suite 360 env MOBA_GPU_SUITE_OUT="$OUT/gpu-suite.json" python -m pytest -q -m gpu tests/test_gpu_suite.py ;;
    paper) step paper 75 $BENCH --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --max-dense-seconds 3 ;;
    paper8) step paper8 90 $BENCH --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd ;;
    flashmoba) step flashmoba 60 $BENCH --preset flashmoba --seq 512k --pass fwd,fwd+bwd --max-dense-seconds 2 ;;
    gqa) step gqa 90 $BENCH --preset paper --seq 128k --heads 32 --kv-heads 8 --pass fwd,fwd+bwd ;;
    10m) step 10m 120 $BENCH --preset 10m --repeats 2 ;;
    breakdown) step breakdown 120 python benchmarks/fwd_breakdown.py --shapes paper-1m,flashmoba-512k --pass fwd,fwd+bwd ;;
    sweep) step sweep 400 python benchmarks/kernel_sweep.py ;;
    decode) step decode 240 python benchmarks/decode_check.py --lengths 128k,1m --iters 10 --out "$OUT" ;;
    hf) step hf 240 python benchmarks/hf_prefill.py ;;
    *) echo "error: unknown step '$s' (see the top of $0)"; exit 2 ;;
  esac
done
exit $failed
