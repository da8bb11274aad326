#!/usr/bin/env bash
# `moba data build` on the GPU machine, from its own installed packages (nothing travels): for whoever
# holds the device. Writes under $OUT:
#   synthetic/: a fixed synthetic-only build whose manifest_hash must equal EXPECTED below (the hash this
#               branch's CPU machine gets; a mismatch with the same tokenizers version is a determinism bug);
#   code-50m/:  manifest and JSON summary of a 50M-token code corpus (build time, tokens/s on this box);
#   corpus.json: how much .py text this machine's site-packages hold (what a scaling recipe can use).
# Datasets themselves stay in /tmp. About 2-4 minutes on a 16-core H100/H200 host.
set -u
OUT=${OUT:-/tmp/moba-data-check}
WORK=${WORK:-/tmp/moba-data-work}
EXPECTED=${EXPECTED:-01f0f899a039349bb62ac24fb4c6116d940ee324b257ecf33791636ab3be712a}  # tokenizers 0.23.3
mkdir -p "$OUT/synthetic" "$OUT/code-50m" "$WORK"
rm -rf "$WORK/synthetic" "$WORK/code-50m"
cd "$(dirname "$0")/.."

python - "$OUT/corpus.json" <<'PY'
import json, sys, time
import tokenizers
from moba_cli.train.data_config import CodeSource
from moba_cli.train.data_sources import code_files, site_roots
t0 = time.perf_counter()
files = code_files(CodeSource())
sizes = [p.stat().st_size for _, p in files]
top = {}
for (name, _), size in zip(files, sizes):
    top[name.split("/")[0]] = top.get(name.split("/")[0], 0) + size
info = {"roots": [str(r) for r in site_roots()], "py_files": len(files), "py_bytes": sum(sizes),
        "py_bytes_under_1MiB_files": sum(s for s in sizes if s <= 1 << 20), "list_seconds": time.perf_counter() - t0,
        "largest_packages": sorted(top.items(), key=lambda kv: -kv[1])[:25], "tokenizers": tokenizers.__version__}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print({k: v for k, v in info.items() if k != "largest_packages"})
PY

t0=$SECONDS
python -m moba_cli data build --source synthetic --synthetic-docs 60 --synthetic-lengths 1k,3k --vocab 1024 \
  --val-fraction 0.1 --out "$WORK/synthetic" --result "$OUT/synthetic/summary.json" >"$OUT/synthetic/log.txt" 2>&1
echo "synthetic: rc=$? in $((SECONDS - t0)) s"
cp "$WORK/synthetic/manifest.json" "$OUT/synthetic/" 2>/dev/null
python - "$WORK/synthetic/manifest.json" "$EXPECTED" <<'PY'
import json, sys
got = json.load(open(sys.argv[1]))["manifest_hash"]
print(f"synthetic manifest_hash {got}: {'SAME as' if got == sys.argv[2] else 'DIFFERENT from'} {sys.argv[2]}")
PY

t0=$SECONDS
COLUMNS=120 python -m moba_cli data build --source code --vocab 8192 --max-tokens 50m --out "$WORK/code-50m" \
  --result "$OUT/code-50m/summary.json" >"$OUT/code-50m/log.txt" 2>&1
echo "code-50m: rc=$? in $((SECONDS - t0)) s"
cp "$WORK/code-50m/manifest.json" "$OUT/code-50m/" 2>/dev/null
tail -15 "$OUT/code-50m/log.txt"
