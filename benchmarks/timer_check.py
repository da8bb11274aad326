"""One call, several timers: why `moba bench` and `benchmarks/fwd_memory_probe.py` disagree on the paper
preset's 1M forward (60-66 ms against 56-57 ms on the same machine since 3e87528; they agreed within 1%
at dabd1cb). GPU only; writes one JSON.

    python benchmarks/timer_check.py OUT.json [SEQ]

The same `moba bench` op (provider moba-triton, the bench's inputs) is timed in one process:
``probe``: CUDA events around each call and a sync after it, 5 calls (the probe's timer); ``bench``:
``runner.time_call`` (warm-up, a 256 MiB L2 flush before each of 3 calls enqueued back to back);
``bench_no_flush``: the same without the flush; ``probe_flush``: the probe's timer with the flush. Each
before and after the bench's float32 spot check, which the bench runs first and the probe never does.
Also the host time to enqueue one call, and the host syncs one call makes (``set_sync_debug_mode``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch
from common import event_times

from moba_cli.bench import runner
from moba_cli.bench.case import Case
from moba_cli.bench.check import Reference
from moba_cli.bench.providers import PROVIDERS, make_inputs
from moba_cli.results import collect_env


def queued_timer(fn, runs: int = 3, flush: torch.Tensor | None = None) -> list[float]:
    """runner.time_call's loop: every call enqueued back to back, one sync at the end."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def timings(fn) -> dict:
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    out = {
        "probe": event_times(fn),
        "probe_flush": event_times(fn, flush=flush),
        "queued_flush": queued_timer(fn, flush=flush),
        "queued_no_flush": queued_timer(fn),
    }
    del flush
    out["bench_time_call_ms"] = runner.time_call(fn, "cuda", 3).ms
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    out["host_enqueue_ms"] = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in out.items()} | {
        "all": {k: v for k, v in out.items() if isinstance(v, list)}}


def host_syncs(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    out_path = sys.argv[1]
    seq = int(sys.argv[2]) if len(sys.argv) > 2 else 2**20
    case = Case("fwd", 1, seq, 1, 1, 128, 4096, 12, "bfloat16", "cuda")
    inputs = make_inputs(case, 0)
    provider = next(p for p in PROVIDERS if p.name == "moba-triton")
    op = provider.build(case, inputs)

    def fn():
        with torch.no_grad():
            return op.forward()

    rec: dict = {"case": {"seq": seq, "heads": 1, "chunk": 4096, "topk": 12, "dtype": "bfloat16"},
                 "env": collect_env(), "command": " ".join(["benchmarks/timer_check.py", *sys.argv[1:]])}
    rec["host_syncs_per_call"] = host_syncs(fn)
    rec["before_spot_check"] = timings(fn)
    reference = Reference(inputs.q, inputs.k, inputs.v, chunk=case.chunk, topk=case.topk, decode=False, n_rows=256,
                          seed=0)
    with torch.no_grad():
        check = reference.check("moba", op.forward())
    rec["spot_check_passed"] = check.ok
    rec["after_spot_check"] = timings(fn)
    with open(out_path, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in rec.items() if k != "env"}, default=str))


if __name__ == "__main__":
    main()
