"""Spot-checks: before a provider is timed, its output must match a float32 reference on the same inputs.

At long lengths a full reference does not fit, so the reference is computed for a few hundred sampled
query rows only (the first and last token, block edges, random rows), with the reference gate of
:mod:`moba_cli.ops.moba.naive` (float32 block means, ``score_blocks``, ``top_blocks``: the earlier block
wins ties), the own block attended causally. Dense providers are checked against plain
causal softmax attention on the same rows.

For ``fwd+bwd`` the provider also runs a backward pass with an output gradient that is zero except on the
sampled rows. Then ``dk``/``dv`` hold only those rows' contributions, which the reference computes exactly
(autograd through the sampled rows), and ``dq`` is compared on the sampled rows.

A row whose top-k choice is a near tie (the last chosen and the first left-out block score within
``GATE_TIE_EPS`` of each other, relative to ``|q| * max |mean|``) is left out of the MoBA comparison: a
kernel that sums the block means in another order may rightly pick the other block there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moba_cli.ops.moba.layout import make_layout, num_slots
from moba_cli.ops.moba.naive import block_means, score_blocks, top_blocks
from moba_cli.utils.metrics import finite_or_none, rel_l2

GATE_TIE_EPS = 1e-4
# (output, gradients) relative errors allowed per dtype. A wrong kernel is off by O(1).
TOLERANCES = {
    torch.bfloat16: (3e-2, 6e-2),
    torch.float16: (1e-2, 3e-2),
    torch.float32: (5e-3, 1e-2),  # kernels may use TF32 matmuls for float32
}
_SCORE_BUDGET = 2**26  # float32 elements of one row-group's score matrix (256 MiB; about 4x that with autograd)


@dataclass
class CheckResult:
    ok: bool
    rows: int  # (row, head) pairs compared
    excluded: int  # (row, head) pairs left out as gate near-ties
    out_err: float | None
    grad_err: float | None
    tol_out: float
    tol_grad: float
    message: str

    def fields(self) -> dict:
        # A NaN/inf error becomes null (strict JSON); the failed check's message says what it was.
        return {
            "check_rows": self.rows, "check_excluded": self.excluded, "check_out_err": finite_or_none(self.out_err),
            "check_grad_err": finite_or_none(self.grad_err), "check_tol": self.tol_out,
        }


def sample_rows(batch: int, seq: int, chunk: int, n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows to check: ``(batch_index [R], position [R])``, sorted, on CPU.

    Always the first and last token and the first blocks' edges (where off-by-one bugs live), then random.
    """
    gen = torch.Generator().manual_seed(seed)
    per_seq = max(4, math.ceil(n_rows / batch))
    bs, ps = [], []
    for b in range(batch):
        fixed = {0, seq - 1, min(seq - 1, chunk - 1), min(seq - 1, chunk), min(seq - 1, 2 * chunk), seq // 2}
        # Random rows without repeats; a long sequence is sampled, not permuted whole.
        if seq <= 1 << 20:
            cand = torch.randperm(seq, generator=gen)
        else:
            cand = torch.randint(0, seq, (4 * per_seq,), generator=gen)
        pos = set(fixed)
        for x in cand.tolist():
            if len(pos) >= per_seq:
                break
            pos.add(x)
        pos = sorted(pos)
        bs += [b] * len(pos)
        ps += pos
    return torch.tensor(bs, dtype=torch.long), torch.tensor(ps, dtype=torch.long)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 matmuls (no TF32) for the gate and the references, whatever the process set before."""
    prec = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _group_size(heads: int, keys: int) -> int:
    return max(1, _SCORE_BUDGET // max(1, heads * keys))


def select_rows(
    q_rows: torch.Tensor, pos: torch.Tensor, means: torch.Tensor, chunk: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA's choice for some rows, by the reference gate rule (:func:`~moba_cli.ops.moba.naive.top_blocks`).

    q_rows ``[r, Hq, D]``, pos ``[r]`` positions in one sequence, means ``[nb, Hkv, D]`` float32 block means
    of that sequence. Returns ``chosen [r, Hq, nb]`` bool (own block included) and ``near_tie [r, Hq]``.
    """
    r, hq, _ = q_rows.shape
    nb, hkv = means.shape[0], means.shape[1]
    own = pos // chunk
    past = torch.arange(nb, device=pos.device)[None, :] < own[:, None]
    scores = score_blocks(q_rows, means).masked_fill(~past[:, None, :], float("-inf"))  # [r, Hq, nb]
    chosen = torch.zeros(r, hq, nb + 1, dtype=torch.bool, device=q_rows.device)
    chosen.scatter_(2, own.view(r, 1, 1).expand(r, hq, 1), True)
    near_tie = torch.zeros(r, hq, dtype=torch.bool, device=q_rows.device)
    n = min(num_slots(topk, nb) - 1, nb)
    if n > 0:
        local = top_blocks(scores, n)  # [r, Hq, n], -1 where fewer past blocks
        chosen.scatter_(2, torch.where(local >= 0, local, nb), True)
        if n < nb:
            # The last chosen score against the best one left out: a near tie may rightly go either way.
            last = scores.gather(2, local[..., n - 1 :].clamp_min(0)).squeeze(2)
            nxt = scores.masked_fill(chosen[..., :nb], float("-inf")).amax(-1)
            # Size of a dot product's rounding error: |q| * |mean|, per (row, head).
            mean_norm = means.norm(dim=-1).max(dim=0).values  # [Hkv]
            scale = q_rows.float().norm(dim=-1) * mean_norm.repeat_interleave(hq // hkv)[None, :]
            near_tie = (local[..., -1] >= 0) & torch.isfinite(nxt) & ((last - nxt) <= GATE_TIE_EPS * scale)
    return chosen[..., :nb], near_tie


def attend_rows(
    q_rows: torch.Tensor, pos: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, scale: float,
    chosen: torch.Tensor | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """Softmax attention of some rows, float32. q_rows ``[r, Hq, D]``, kf/vf ``[S, Hkv, D]`` -> ``[r, Hq, D]``.

    Row ``i`` sees keys ``<= pos[i]``; with ``chosen [r, Hq, nb]`` only keys in chosen blocks (MoBA).
    """
    r, hq, d = q_rows.shape
    hkv = kf.shape[1]
    g = hq // hkv
    n = int(pos.max().item()) + 1
    s = torch.einsum("rhgd,khd->rhgk", q_rows.view(r, hkv, g, d), kf[:n]).reshape(r, hq, n) * scale
    keys = torch.arange(n, device=pos.device)
    allowed = (keys[None, :] <= pos[:, None])[:, None, :]
    if chosen is not None:
        allowed = allowed & chosen[:, :, keys // chunk]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("rhgk,khd->rhgd", p.view(r, hkv, g, n), vf[:n]).reshape(r, hq, d)


@dataclass
class _Expected:
    out: torch.Tensor  # [R, Hq, D] float32
    keep: torch.Tensor  # [R, Hq] bool: rows compared (not near ties)
    do_rows: torch.Tensor | None = None  # [R, Hq, D] output gradient on the sampled rows (0 where not kept)
    dq: torch.Tensor | None = None  # [R, Hq, D] float32
    dk: torch.Tensor | None = None  # [B, S, Hkv, D] float32, on CPU (large)
    dv: torch.Tensor | None = None


class Reference:
    """Float32 references of one case on sampled rows, computed once per kind (``moba``/``dense``).

    Prefill: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``. Decode: q ``[B, Hq, D]`` is the token at
    ``S - 1`` of a full KV cache k/v ``[B, S, Hkv, D]``.
    """

    def __init__(self, q, k, v, *, chunk: int, topk: int, decode: bool, n_rows: int, seed: int,
                 grad_rows: int = 64):
        self.q, self.k, self.v = q, k, v
        self.chunk, self.topk, self.decode = chunk, topk, decode
        b, s = k.shape[0], k.shape[1]
        self.scale = 1.0 / math.sqrt(k.shape[-1])
        if decode:
            self.bidx = torch.arange(b)
            self.pos = torch.full((b,), s - 1, dtype=torch.long)
        else:
            self.bidx, self.pos = sample_rows(b, s, chunk, n_rows, seed)
        self.grad_rows = grad_rows
        self._cache: dict[tuple[str, bool], _Expected] = {}
        self.seed = seed

    def _q_rows(self, b: int, sel: torch.Tensor) -> torch.Tensor:
        if self.decode:
            return self.q[b][None].float()
        return self.q[b, self.pos[sel].to(self.q.device)].float()

    def expected(self, kind: str, grads: bool) -> _Expected:
        key = (kind, grads)
        if key not in self._cache:
            with exact_float32():
                self._cache[key] = self._compute(kind, grads)
        return self._cache[key]

    def _compute(self, kind: str, grads: bool) -> _Expected:
        dev = self.k.device
        hq = self.q.shape[-2]
        outs, keeps, dqs, dos = [], [], [], []
        dk_all = dv_all = None
        if grads:
            dk_all = torch.zeros(self.k.shape, dtype=torch.float32)
            dv_all = torch.zeros(self.v.shape, dtype=torch.float32)
            gen = torch.Generator().manual_seed(self.seed + 1)
        for b in range(self.k.shape[0]):
            sel = (self.bidx == b).nonzero().flatten()
            if len(sel) == 0:
                continue
            pos_b = self.pos[sel].to(dev)
            kf = self.k[b].detach().float().requires_grad_(grads)
            vf = self.v[b].detach().float().requires_grad_(grads)
            means = None
            if kind == "moba":
                cu = torch.tensor([0, self.k.shape[1]], dtype=torch.int32, device=dev)
                means = block_means(self.k[b].detach(), make_layout(cu, self.chunk))
            dk_b = torch.zeros_like(kf) if grads else None
            dv_b = torch.zeros_like(vf) if grads else None
            group = _group_size(hq, int(pos_b.max().item()) + 1)
            for r0 in range(0, len(sel), group):
                ps = pos_b[r0 : r0 + group]
                qr = self._q_rows(b, sel[r0 : r0 + group]).detach().requires_grad_(grads)
                keep = torch.ones(len(ps), hq, dtype=torch.bool, device=dev)
                chosen = None
                if kind == "moba":
                    with torch.no_grad():
                        chosen, near_tie = select_rows(qr.detach(), ps, means, self.chunk, self.topk)
                    keep = ~near_tie
                with torch.set_grad_enabled(grads):
                    o = attend_rows(qr, ps, kf, vf, self.scale, chosen, self.chunk)
                if grads:
                    do = torch.randn(o.shape, generator=gen).to(dev) * keep[..., None]
                    dq, dk, dv = torch.autograd.grad(o, (qr, kf, vf), do)
                    dk_b += dk
                    dv_b += dv
                    dqs.append(dq.detach())
                    dos.append(do)
                outs.append(o.detach())
                keeps.append(keep)
            if grads:
                dk_all[b] = dk_b.cpu()
                dv_all[b] = dv_b.cpu()
            del kf, vf, dk_b, dv_b, means
        exp = _Expected(out=torch.cat(outs), keep=torch.cat(keeps))
        if grads:
            exp.dq, exp.do_rows, exp.dk, exp.dv = torch.cat(dqs), torch.cat(dos), dk_all, dv_all
        return exp

    def grad_output(self, kind: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Output gradient ``[B, S, Hq, D]`` for a provider's checked backward: zero off the sampled rows."""
        exp = self.expected(kind, grads=True)
        do = torch.zeros(shape, dtype=dtype, device=self.k.device)
        do[self.bidx.to(do.device), self.pos.to(do.device)] = exp.do_rows.to(dtype)
        return do

    def check(
        self, kind: str, out: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> CheckResult:
        """Compare a provider's output (and gradients from :meth:`grad_output`) with the reference.

        out: prefill ``[B, S, Hq, D]``, decode ``[B, Hq, D]``; grads: ``(dq, dk, dv)`` shaped like q, k, v.
        """
        tol_out, tol_grad = TOLERANCES[self.k.dtype]
        exp = self.expected(kind, grads=grads is not None)
        got = out[self.bidx.to(out.device)] if self.decode else out[self.bidx.to(out.device), self.pos.to(out.device)]
        got = got.float()
        err = (got - exp.out).norm(dim=-1) / exp.out.norm(dim=-1).clamp_min(1e-12)  # [R, Hq]
        keep = exp.keep
        n_keep = int(keep.sum().item())
        excluded = keep.numel() - n_keep
        out_err = float(err[keep].max().item()) if n_keep else None
        grad_err = None
        problems = []
        if n_keep < max(1, keep.numel() // 2):
            problems.append(f"only {n_keep} of {keep.numel()} sampled (row, head) pairs are free of gate near-ties")
        if out_err is not None and not math.isfinite(out_err):
            bad = int((~torch.isfinite(err) & keep).sum())
            problems.append(f"output has NaN or infinite values in {bad} of {n_keep} sampled (row, head) pairs")
        elif out_err is not None and not (out_err <= tol_out):
            worst = int(err.masked_fill(~keep, -1).flatten().argmax().item()) // keep.shape[1]
            problems.append(
                f"output off by {out_err:.3g} (relative, tolerance {tol_out:g}) at token "
                f"{int(self.pos[worst])} of sequence {int(self.bidx[worst])}"
            )
        if grads is not None:
            dq, dk, dv = grads
            dq_rows = dq[self.bidx.to(dq.device), self.pos.to(dq.device)].float()
            errs = {"dq": rel_l2(dq_rows, exp.dq), "dk": _rel_chunked(dk, exp.dk), "dv": _rel_chunked(dv, exp.dv)}
            # Python's max would skip a NaN depending on its position; a NaN gradient error must win.
            grad_err = max(errs.values()) if all(math.isfinite(e) for e in errs.values()) else float("nan")
            bad = {k: v for k, v in errs.items() if not (v <= tol_grad)}
            if bad:
                problems.append(
                    "gradients off: " + ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                    + f" (relative, tolerance {tol_grad:g})"
                )
        return CheckResult(
            ok=not problems, rows=n_keep, excluded=excluded, out_err=out_err, grad_err=grad_err,
            tol_out=tol_out, tol_grad=tol_grad, message="; ".join(problems) or "ok",
        )


def _rel_chunked(a: torch.Tensor, ref_cpu: torch.Tensor, rows: int = 65536) -> float:
    """Relative L2 error of a large gradient against a CPU float32 reference, a slice at a time."""
    num = den = 0.0
    for b in range(a.shape[0]):
        for s0 in range(0, a.shape[1], rows):
            r = ref_cpu[b, s0 : s0 + rows].to(a.device)
            num += float((a[b, s0 : s0 + rows].float() - r).pow(2).sum().item())
            den += float(r.pow(2).sum().item())
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)
