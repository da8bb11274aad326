#!/usr/bin/env bash
# GPU check of `moba compare` (for whoever holds the GPU): the CUDA defaults (32k, bf16, triton), the naive
# backend, GQA in fp16, fp32, a 128k run (recall on sampled rows) and a 1M run (equivalence on a prefix).
# Writes every JSON and log under $OUT and prints one summary line per run. About 2-4 minutes on an H200.
set -u
OUT=${OUT:-/tmp/moba-compare-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

run() {
  local name=$1; shift
  local t0=$SECONDS
  timeout 400 python -m moba_cli compare "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s  (moba compare $*)"
}

run default
run naive --backend naive
run gqa_fp16 --kv-heads 2 --dtype fp16
run fp32 --dtype fp32
run long_128k --seq 128k --heads 8 --kv-heads 2
run long_1m --seq 1m --heads 4 --kv-heads 1 --chunk 4k --topk 4

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':10} {'seq':>8} {'dtype':9} {'backend':7} {'rel_l2':>8} {'recall':>7} {'p5':>7} {'oracle':>7} "
      f"{'sparsity':>8} {'agree':>7} {'eq':>4} {'eq_rel_l2':>9} {'tol':>7} {'sdpa':>9} {'eq_tok':>7} {'s':>6}")
for f in sorted(out.glob("*.json")):
    d = json.loads(f.read_text()); c, s = d["config"], d["summary"]; e = s["equivalence"]
    agree = s.get("selection_agreement")
    print(f"{f.stem:10} {c['seq']:>8} {c['dtype']:9} {c['backend']:7} {s['rel_l2']:8.4f} {s['recall_mean']:7.4f} "
          f"{s['recall_p5']:7.4f} {s['recall_oracle_mean']:7.4f} {s['sparsity']:8.3f} "
          f"{'-' if agree is None else f'{agree:.4f}':>7} {'ok' if e['passed'] else 'FAIL':>4} {e['rel_l2']:9.2e} "
          f"{e['tolerance']['rel_l2']:7.0e} {e['sdpa_rel_l2']:9.2e} {e['tokens_per_sequence']:>7} {s['seconds']:6.1f}")
PY
for f in "$OUT"/*.log; do grep -H "error:" "$f"; done
exit 0
