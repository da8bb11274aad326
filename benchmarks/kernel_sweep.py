"""Launch-configuration sweep of the MoBA kernels through the documented ``MOBA_*_CFG`` switches: each
forward config (``MOBA_FWD_CFG=BLOCK_M,BLOCK_N,warps,stages``), backward config (``MOBA_BWD_CFG``, same
fields) and gate config (``MOBA_GATE_CFG``) is timed on the public call at the preset shapes, with the
time of the stage it changes (from torch.profiler kernel names). A config that does not compile (too much
shared memory, too many registers) is recorded as an error and the sweep goes on.

    python benchmarks/kernel_sweep.py                       # paper-1m and flashmoba-512k
    python benchmarks/kernel_sweep.py --shapes gqa-128k --kinds fwd,bwd

Writes ``$OUT/kernel-sweep-<time>-....json`` (moba-result/1) and prints the best config per kernel and shape.
A few minutes on an H100/H200 for the default shapes and configs.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import SHAPES, call, inputs, median_ms, need_cuda, parse_shapes, shape_record, stage_times, write

# (environment switch, pass timed, stage whose time the switch changes, configs to try)
SWEEPS = {
    "fwd": ("MOBA_FWD_CFG", "fwd", "moba attention", ["128,128,8,3", "128,64,8,3", "64,64,4,3", "64,32,4,3"]),
    "bwd": ("MOBA_BWD_CFG", "fwd+bwd", "moba attention", ["64,128,8,2", "64,128,8,3", "64,64,4,2", "32,128,8,2"]),
    "gate": ("MOBA_GATE_CFG", "fwd", "gate", ["64,16,4", "128,16,8", "128,16,4", "64,32,4"]),
}


def measure(shape, backward: bool, stage: str) -> tuple[float, float | None]:
    q, k, v = inputs(shape, grad=backward)
    fn = call(shape, q, k, v, backward)
    wall = median_ms(fn, rep_ms=200)
    stages, _ = stage_times(fn, calls=3)
    return wall, stages.get(stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="paper-1m,flashmoba-512k", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--kinds", default="fwd,bwd,gate", help="which switches to sweep: fwd, bwd, gate")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in SWEEPS for k in kinds):
        raise SystemExit(f"error: --kinds takes a comma list of {', '.join(SWEEPS)}")
    shapes = parse_shapes(args.shapes)
    need_cuda()
    for var, *_ in SWEEPS.values():
        if os.environ.get(var):
            raise SystemExit(f"error: unset {var} first; the sweep sets it")
    records = []
    for name, shape in shapes.items():
        for kind in kinds:
            var, pas, stage, configs = SWEEPS[kind]
            for cfg in [None, *configs]:  # None: the built-in choice, the baseline
                if cfg is not None:
                    os.environ[var] = cfg
                rec = {**shape_record(name, shape), "kernel": kind, "switch": var, "cfg": cfg or "default",
                       "pass": pas, "stage": stage}
                try:
                    rec["call_ms"], rec["stage_ms"] = measure(shape, pas == "fwd+bwd", stage)
                    rec["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - a config that cannot compile is a result, not the end
                    rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
                finally:
                    os.environ.pop(var, None)
                    torch.cuda.empty_cache()
                records.append(rec)
                shown = f"{rec['call_ms']:9.3f} ms call, {rec['stage_ms'] or 0:9.3f} ms {stage}" \
                    if rec["status"] == "ok" else rec["reason"][:120]
                print(f"{name:>15} {kind:>4} {rec['cfg']:>12}  {shown}", flush=True)
    best = {}
    for r in records:
        key = f"{r['shape']}/{r['kernel']}"
        if r["status"] == "ok" and (key not in best or r["call_ms"] < best[key]["call_ms"]):
            best[key] = {"cfg": r["cfg"], "call_ms": r["call_ms"], "stage_ms": r["stage_ms"]}
    for key, b in best.items():
        print(f"best {key}: {b['cfg']} ({b['call_ms']:.3f} ms)")
    path = write("kernel-sweep", {"shapes": list(shapes), "kinds": kinds}, records, {"best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
