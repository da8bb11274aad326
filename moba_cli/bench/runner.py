"""Runs the cases: inputs, spot-check, timing, memory, and every failure recorded instead of raised.

Per (case, provider) the order is: build the op -> spot-check it against the float32 reference
(:mod:`moba_cli.bench.check`; a mismatch is status ``error`` and the provider is not timed) -> time it.

Timing (:func:`time_call`): the spot-check call is the first warm-up (compilation, autotuning); then one
call measured for memory and a first time, more warm-up (about 50 ms) for short calls, then ``runs``
calls each timed with CUDA events after the L2 cache was flushed (a 256 MiB write), as
``triton.testing.do_bench`` does (on CPU, a smoke run: host wall clock, no flush; each record's ``timer``
says which). ``runs`` is ``--repeats``, raised to fill about 100 ms for short calls
(at most 100), lowered to about 10 s for long ones (at least 3, or ``--repeats`` if smaller). Median,
min and max are reported.

Memory: ``peak_mem_bytes`` is the most the call allocated *above* what was allocated just before it (the
inputs and anything the provider prepared outside the timed region); ``peak_mem_total_bytes`` is the
process's whole peak during the call, inputs included. Both from ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``; None on CPU.

Dense baselines that would take longer than ``--max-dense-seconds`` per call are not run: their time is
extrapolated from the largest measured length by the S^2 law, with ``status: "estimated"`` and
``estimated_from``. When no shorter length was measured, one "anchor" length is measured first (a normal
record with ``anchor_for`` set).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moba_cli.bench import flops as F
from moba_cli.bench.case import Case
from moba_cli.bench.check import Reference
from moba_cli.bench.presets import BenchConfig
from moba_cli.bench.providers import BY_NAME, Inputs, Op, Provider, Unsupported, make_inputs
from moba_cli.errors import MobaError

STATUSES = ("ok", "oom", "skipped", "estimated", "error")
RECORD_FIELDS = [
    "provider", "kind", "pass", "batch", "seq", "heads", "kv_heads", "head_dim", "chunk", "topk", "dtype",
    "device", "status", "ms", "ms_min", "ms_max", "runs", "tflops", "flops", "attended_pairs", "sparsity",
    "peak_mem_bytes", "peak_mem_total_bytes", "speedup_vs_sdpa_cudnn", "speedup_vs_sdpa_flash",
    "baseline_estimated", "check_rows", "check_excluded", "check_out_err", "check_grad_err", "check_tol",
    "estimated_from", "anchor_for", "reason", "note", "timer",
]
# How ``ms`` was measured, per device kind: written in every timed record and in the summary.
TIMERS = {
    "cuda": "CUDA events, L2 cache flushed (a 256 MiB write) before each call",
    "cpu": "host wall clock (time.perf_counter) around each call; no cache flush",
}
# Rough dense throughput used only to decide whether a dense call needs an anchor measurement first.
_PESSIMISTIC_TFLOPS = {"cuda": {"float32": 20.0, "default": 150.0}, "cpu": {"float32": 0.02, "default": 0.02}}
_SHORT_S, _LONG_S = 0.1, 10.0
_MIN_ANCHOR_SEQ = 128


@dataclass
class Timing:
    ms: float
    ms_min: float
    ms_max: float
    runs: int
    peak_mem_bytes: int | None
    peak_mem_total_bytes: int | None
    timer: str  # how the times were taken: a value of TIMERS


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cudnn_status_alloc_failed" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_call(fn: Callable[[], object], device: str, repeats: int) -> Timing:
    """Median/min/max milliseconds of ``fn()`` and its peak memory; see the module docstring."""
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # The spot-check has already called the op once on these shapes (compilation, autotuning, plans), and
    # the call below, measured for memory, warms up the allocator; short calls get more warm-up after it.
    peak = total = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if cuda:
        total = torch.cuda.max_memory_allocated()
        peak = total - before
    if first < _SHORT_S:
        runs = min(100, max(repeats, math.ceil(_SHORT_S / max(first, 1e-6))))
        warm_until = time.perf_counter() + 0.05  # a little more warm-up so clocks settle
        while time.perf_counter() < warm_until:
            fn()
        sync()
    elif first > 1.0:
        runs = min(repeats, max(3, math.ceil(_LONG_S / first)))
    else:
        runs = repeats
    times = []
    if cuda:
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for i in range(runs):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        del flush
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    timer = TIMERS["cuda" if cuda else "cpu"]
    return Timing(statistics.median(times), min(times), max(times), runs, peak, total, timer)


def new_record(case: Case, provider: Provider) -> dict:
    rec = dict.fromkeys(RECORD_FIELDS)
    pairs = F.call_pairs(provider.kind, case.pass_, case.batch, case.seq, case.heads, case.chunk, case.topk)
    dense = F.call_pairs("dense", case.pass_, case.batch, case.seq, case.heads, case.chunk, case.topk)
    rec.update(
        provider=provider.name, kind=provider.kind, batch=case.batch, seq=case.seq, heads=case.heads,
        kv_heads=case.kv_heads, head_dim=case.head_dim, chunk=case.chunk, topk=case.topk, dtype=case.dtype,
        device=case.device, attended_pairs=pairs, sparsity=1.0 - pairs / dense,
        flops=F.attention_flops(pairs, case.head_dim, case.pass_),
    )
    rec["pass"] = case.pass_
    return rec


def _history_key(rec_or_case, provider: str) -> tuple:
    if isinstance(rec_or_case, dict):
        r = rec_or_case
        return (provider, r["pass"], r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"])
    c = rec_or_case
    return (provider, c.pass_, c.batch, c.heads, c.kv_heads, c.head_dim, c.dtype)


class Runner:
    """Runs every case of a config with the chosen providers and returns flat records."""

    def __init__(self, config: BenchConfig, on_step: Callable[[str, dict], None] | None = None,
                 providers: list[Provider] | None = None):
        self.config = config
        self.providers = providers if providers is not None else [BY_NAME[n] for n in config.providers]
        self.on_step = on_step or (lambda label, rec: None)
        self.records: list[dict] = []
        self._measured: dict[tuple, list[dict]] = {}  # history for S^2 extrapolation
        self._case_index = 0

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        for case in self.config.cases():
            self.run_case(case, self.providers)
        return self.records

    def run_case(self, case: Case, providers: list[Provider], anchor_for: int | None = None) -> list[dict]:
        """All providers on one case, sharing one set of inputs; returns (and keeps) their records."""
        self._case_index += 1
        out: list[dict] = []
        todo: list[Provider] = []
        for p in providers:
            rec = new_record(case, p)
            rec["anchor_for"] = anchor_for
            reason = p.unavailable(case)
            if reason:
                rec.update(status="skipped", reason=reason)
                self._finish(rec, case, p)
                out.append(rec)
                continue
            if p.kind == "dense" and case.pass_ != "decode" and anchor_for is None:
                est = self._maybe_estimate(case, p, rec)
                if est is not None:
                    self._finish(est, case, p)
                    out.append(est)
                    continue
            todo.append(p)
        if todo:
            out += self._measure_case(case, todo, anchor_for)
        return out

    def _measure_case(self, case: Case, providers: list[Provider], anchor_for: int | None) -> list[dict]:
        out = []
        inputs = reference = None
        try:
            inputs = make_inputs(case, self.config.seed + self._case_index)
            reference = Reference(inputs.q, inputs.k, inputs.v, chunk=case.chunk, topk=case.topk,
                                  decode=case.pass_ == "decode", n_rows=self.config.check_rows,
                                  seed=self.config.seed)
        except Exception as e:  # noqa: BLE001 - recorded per provider below
            failure = ("oom" if is_oom(e) else "error", f"creating the inputs failed: {type(e).__name__}: {e}")
            del e
            inputs = reference = None
            free_memory()
            for p in providers:
                rec = new_record(case, p)
                rec.update(status=failure[0], reason=failure[1], anchor_for=anchor_for)
                self._finish(rec, case, p)
                out.append(rec)
            return out
        # The float32 references first, so that a reference that does not fit is not blamed on a provider.
        ref_failed: dict[str, str] = {}
        for kind in sorted({p.kind for p in providers}):
            try:
                reference.expected(kind, grads=case.pass_ == "fwd+bwd")
            except Exception as e:  # noqa: BLE001
                ref_failed[kind] = ("ran out of memory" if is_oom(e) else f"{type(e).__name__}: {e}")
                del e
                free_memory()
        for p in providers:
            rec = new_record(case, p)
            rec["anchor_for"] = anchor_for
            if p.kind in ref_failed:
                rec.update(status="error",
                           reason=f"not timed: the spot-check reference failed ({ref_failed[p.kind]})")
            else:
                self.measure_one(case, p, inputs, reference, rec)
            self._finish(rec, case, p)
            out.append(rec)
        del inputs, reference
        free_memory()
        return out

    def _finish(self, rec: dict, case: Case, provider: Provider) -> None:
        self.records.append(rec)
        if rec["status"] == "ok":
            self._measured.setdefault(_history_key(case, provider.name), []).append(rec)
        if rec.get("anchor_for") is None:
            self.on_step(f"{case.label} {provider.name}", rec)

    # -- one provider ---------------------------------------------------------------------------------
    def measure_one(self, case: Case, provider: Provider, inputs: Inputs, reference: Reference, rec: dict) -> None:
        """Build, spot-check and time; fills ``rec`` (status and numbers). Never raises for a provider's fault."""
        failure = None
        try:
            op = provider.build(case, inputs)
            rec["note"] = op.note
            with op.context():
                result = self._spot_check(case, provider, op, inputs, reference)
                rec.update(result.fields())
                if not result.ok:
                    rec.update(status="error", reason=f"spot-check failed, not timed: {result.message}")
                    return
                timing = time_call(self._timed_fn(case, op, inputs), case.device, self.config.repeats)
            rec.update(status="ok", ms=timing.ms, ms_min=timing.ms_min, ms_max=timing.ms_max, runs=timing.runs,
                       peak_mem_bytes=timing.peak_mem_bytes, peak_mem_total_bytes=timing.peak_mem_total_bytes,
                       tflops=F.tflops(rec["flops"], timing.ms), timer=timing.timer)
        except (Unsupported, MobaError) as e:
            failure = ("skipped", str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one provider's failure must not stop the bench
            if is_oom(e):
                failure = ("oom", f"out of memory: {str(e).splitlines()[0][:300]}")
            elif isinstance(e, RuntimeError) and "No available kernel" in str(e):
                failure = ("skipped", f"torch SDPA has no kernel for this case: {str(e).splitlines()[0]}")
            else:
                last = traceback.extract_tb(e.__traceback__)[-1]
                failure = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]} "
                                    f"(at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
        finally:
            op = None  # drop every reference to the provider's tensors before freeing (an OOM must not leak)
            free_memory()
        if failure is not None:
            rec.update(status=failure[0], reason=failure[1])

    def _spot_check(self, case: Case, provider: Provider, op: Op, inputs: Inputs, reference: Reference):
        if case.pass_ == "fwd+bwd":
            out = op.forward()
            do = reference.grad_output(provider.kind, out.shape, out.dtype)
            grads = op.fold_grads(torch.autograd.grad(out, op.grad_inputs, do))
            return reference.check(provider.kind, out.detach(), tuple(g.detach() for g in grads))
        with torch.no_grad():
            out = op.forward()
        return reference.check(provider.kind, out)

    @staticmethod
    def _timed_fn(case: Case, op: Op, inputs: Inputs) -> Callable[[], object]:
        if case.pass_ == "fwd+bwd":
            do = torch.randn(inputs.q.shape, dtype=inputs.q.dtype, device=inputs.q.device)

            def fwd_bwd():
                out = op.forward()
                return torch.autograd.grad(out, op.grad_inputs, do)

            return fwd_bwd

        def fwd():
            with torch.no_grad():
                return op.forward()

        return fwd

    # -- estimates for slow dense baselines ----------------------------------------------------------------
    def _predict_seconds(self, case: Case, provider: Provider) -> tuple[float, dict] | None:
        """Seconds per call at ``case.seq`` from the largest shorter measured length (S^2 law)."""
        hist = [r for r in self._measured.get(_history_key(case, provider.name), []) if r["seq"] < case.seq]
        if not hist:
            return None
        base = max(hist, key=lambda r: r["seq"])
        return base["ms"] * (case.seq / base["seq"]) ** 2 / 1e3, base

    def _pessimistic_seconds(self, case: Case) -> float:
        dev = "cuda" if case.device.startswith("cuda") else "cpu"
        table = _PESSIMISTIC_TFLOPS[dev]
        tf = table.get(case.dtype, table["default"])
        pairs = F.call_pairs("dense", case.pass_, case.batch, case.seq, case.heads, case.chunk, case.topk)
        return F.attention_flops(pairs, case.head_dim, case.pass_) / (tf * 1e12)

    def _maybe_estimate(self, case: Case, provider: Provider, rec: dict) -> dict | None:
        """An ``estimated`` record when the dense call would be too slow, else None (run it)."""
        limit = self.config.max_dense_seconds
        pred = self._predict_seconds(case, provider)
        if pred is None:
            if self._pessimistic_seconds(case) <= limit:
                return None
            anchor = self._anchor_seq(case, limit)
            if anchor is None:
                return None
            self.run_case(case.with_seq(anchor), [provider], anchor_for=case.seq)
            pred = self._predict_seconds(case, provider)
            if pred is None:
                rec.update(status="skipped",
                           reason=f"could not measure {provider.name} at {anchor} tokens to predict its time here")
                return rec
        seconds, base = pred
        if seconds <= limit:
            return None
        ratio = (case.seq / base["seq"]) ** 2
        rec.update(
            status="estimated", ms=base["ms"] * ratio, ms_min=base["ms_min"] * ratio, ms_max=base["ms_max"] * ratio,
            estimated_from={"seq": base["seq"], "ms": base["ms"], "law": "ms ~ seq^2"},
            reason=f"predicted {seconds:.1f} s per call > --max-dense-seconds {limit:g}; extrapolated, not run",
        )
        rec["tflops"] = F.tflops(rec["flops"], rec["ms"])
        return rec

    def _anchor_seq(self, case: Case, limit: float) -> int | None:
        """The longest length S/2^j (>= 128) whose pessimistic time is under a quarter of the limit."""
        candidates = []
        s = case.seq // 2
        while s >= _MIN_ANCHOR_SEQ:
            candidates.append(s)
            s //= 2
        if not candidates:
            return None
        for s in candidates:
            if self._pessimistic_seconds(case.with_seq(s)) <= limit / 4:
                return s
        return candidates[-1]


def add_speedups(records: list[dict]) -> None:
    """``speedup_vs_<baseline> = baseline ms / this ms`` on the same shape and pass (measured or estimated)."""
    index: dict[tuple, dict] = {}
    for r in records:
        if r["status"] in ("ok", "estimated"):
            index[_shape_key(r) + (r["provider"],)] = r
    for r in records:
        if r["ms"] is None or r["status"] not in ("ok", "estimated"):
            continue
        estimated = []
        for base in ("sdpa-cudnn", "sdpa-flash"):
            b = index.get(_shape_key(r) + (base,))
            # A zero time (below the clock's resolution) has no finite ratio: null, never inf in the JSON.
            r[f"speedup_vs_{base.replace('-', '_')}"] = b["ms"] / r["ms"] if b and r["ms"] > 0 else None
            if b and b["status"] == "estimated":
                estimated.append(base)
        r["baseline_estimated"] = ",".join(estimated) or None


def _shape_key(r: dict) -> tuple:
    return (r["pass"], r["batch"], r["seq"], r["heads"], r["kv_heads"], r["head_dim"], r["chunk"], r["topk"],
            r["dtype"])
