#!/usr/bin/env bash
# Issue 4, second session, last GPU call: kernel tests on CUDA (the reference's block means are now
# deterministic on CUDA: the tie-rule test), then `moba bench` with the defaults: flashmoba preset
# (64K-512K, fwd and fwd+bwd), paper preset at 1M with 1 head and at 128K with 8 heads.
# Outputs in $OUT/f2/<step>/, packed into $OUT/f2.tgz. About 7 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=150
OUT=${OUT:-/tmp/moba-gpu-final2}
R="$OUT/f2"
mkdir -p "$R"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  grep -E "\] .*: (ok|estimated|error|oom)|passed|failed" "$R/$name.log" | tail -n 16 | cut -c1-150
}
step triton_tests 120 python -m pytest -q tests/test_triton_moba.py
DENSE="--baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 2 --repeats 3"
step flashmoba 260 python -m moba_cli bench --preset flashmoba --pass fwd,fwd+bwd $DENSE --out "$R/flashmoba"
step paper_1m_h1 90 python -m moba_cli bench --preset paper --heads 1 --seq 1m --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --max-dense-seconds 3 --out "$R/paper_1m_h1"
step paper_128k_h8 60 python -m moba_cli bench --preset paper --heads 8 --seq 128k --pass fwd,fwd+bwd --baselines sdpa-cudnn --repeats 3 --out "$R/paper_128k_h8"
tar czf "$OUT/f2.tgz" -C "$OUT" f2
