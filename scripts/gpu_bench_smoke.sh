#!/usr/bin/env bash
# Quick GPU sanity run of `moba bench` (for whoever holds the GPU): every provider at small sizes, MHA and
# GQA, fwd and fwd+bwd, the decode pass, and the "estimated" path for slow dense baselines. Each run writes
# its JSON, CSV, PNG plots and log under $OUT/<run>/; a summary table follows. About 3-6 minutes on an
# H200, most of it FlexAttention compiling (flex-moba). Exit code 1 if any record has status "error".
set -u
OUT=${OUT:-/tmp/moba-bench-smoke}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

run() {
  local name=$1; shift
  local t0=$SECONDS
  mkdir -p "$OUT/$name"
  COLUMNS=120 timeout 500 python -m moba_cli bench "$@" --out "$OUT/$name" >"$OUT/$name/log.txt" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s  (moba bench $*)"
}

# Every provider (optional ones are recorded as skipped when not installed).
run mha --seq 4k,16k --heads 4 --chunk 512 --topk 3 --pass fwd,fwd+bwd --repeats 3
# GQA: 8 query heads on 2 KV heads (SDPA with enable_gqa, or K/V expanded and noted).
run gqa --seq 16k --heads 8 --kv-heads 2 --chunk 1024 --topk 4 --pass fwd,fwd+bwd --repeats 3
# Decode: one new token against a 16k / 64k cache.
run decode --seq 16k,64k --heads 8 --kv-heads 2 --pass decode --repeats 10
# Estimates: a tiny --max-dense-seconds forces an anchor measurement and an S^2 extrapolation.
run estimate --seq 64k --heads 2 --pass fwd --baselines sdpa-cudnn,sdpa-flash --max-dense-seconds 0.001

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
bad = 0
files = sorted(out.glob("*/bench-*.json"))
if not files:
    sys.exit(f"no result files under {out}: see the logs in {out}/*/log.txt")
print(f"\n{'run':9} {'pass':8} {'seq':>6} {'H':>5} {'provider':12} {'status':9} {'ms':>9} {'TFLOP/s':>8} "
      f"{'GiB+':>6} {'xcuDNN':>7} {'xflash':>7} {'chk_err':>8}  reason")
for f in files:
    d = json.loads(f.read_text())
    for r in d["records"]:
        if r["status"] == "skipped" and r["provider"] in ("flash-attn", "flash-moba", "moba-ref"):
            continue
        bad += r["status"] == "error"
        fmt = lambda x, s: "-" if x is None else format(x, s)  # noqa: E731
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        print(f"{f.parent.name:9} {r['pass']:8} {r['seq']:>6} {r['heads']:>2}/{r['kv_heads']:<2} {r['provider']:12} "
              f"{r['status']:9} {fmt(r['ms'], '.4g'):>9} {fmt(r['tflops'], '.1f'):>8} {fmt(mem, '.2f'):>6} "
              f"{fmt(r['speedup_vs_sdpa_cudnn'], '.2f'):>7} {fmt(r['speedup_vs_sdpa_flash'], '.2f'):>7} "
              f"{fmt(r['check_out_err'], '.1e'):>8}  {(r['reason'] or r['note'] or '')[:110]}")
    written = d["summary"]["files"]
    names = [pathlib.Path(p).name for p in (written["json"], written["csv"], *written.get("plots", []))]
    print(f"{'':9} wrote {', '.join(names)}")
env = d["env"]
print(f"\n{env.get('gpu')} driver {env.get('driver')} torch {env.get('torch')} triton {env.get('triton')} "
      f"cudnn {env.get('cudnn')} flash_attn {env.get('flash_attn')} commit {env.get('git_commit')}")
print(f"records with status error: {bad}" + ("  (see the reasons above and */log.txt)" if bad else ""))
sys.exit(1 if bad else 0)
PY
