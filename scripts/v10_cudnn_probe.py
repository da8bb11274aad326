"""v10 probe (H200): can cuDNN's fused kernels do MoBA's sparse work faster than our Triton forward?

MoBA's past-block work is, per key block, dense non-causal attention of the queries that chose it; the
own-block work is causal attention inside each block. Both map onto PyTorch's cuDNN ops: the varlen
(ragged) one for the gathered queries, one "sequence" per key block, and the batched one for the own
blocks. Partial outputs merge by their log-sum-exp. This probe measures, at the issue's presets:
  1. exactness of that split against the float32 reference (forward, and the backward through cuDNN
     with the merged output and log-sum-exp),
  2. cuDNN's rates (dense causal, non-causal, batched causal, ragged) on the shapes involved,
  3. the whole forward, gather path vs our Triton forward, with cuDNN dense in the same run.
Writes JSON lines to $OUT/v10/probe.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings

import torch

from moba_cli.ops.moba import naive, triton_moba
from moba_cli.ops.moba.layout import cached_layout

warnings.filterwarnings("ignore")
DEV = torch.device("cuda")
D = 128
OUT = os.path.join(os.environ.get("OUT", "/tmp"), "v10")
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "probe.jsonl"), "a")
dense = torch.ops.aten._scaled_dot_product_cudnn_attention
dense_b = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
rag_f = torch.ops.aten._cudnn_attention_forward
rag_b = torch.ops.aten._cudnn_attention_backward
INT_LIMIT = 2**31 - 1


def emit(**kw) -> None:
    kw["t"] = time.strftime("%H:%M:%S")
    line = json.dumps(kw)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def timed(fn, n: int = 3) -> float:
    """Mean ms of n calls after one warm-up call (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def tflops(pairs: float, ms: float, bwd: bool = False) -> float:
    return 4 * D * pairs * (2.5 if bwd else 1.0) / ms / 1e9


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The gather path, as a prototype (torch ops + cuDNN)


class Gathered:
    """Rows of the ragged query buffer: for key block j, ``rows[j]`` rows; head h's choosers of block j
    fill its column from the top (others are padding)."""

    def __init__(self, block_idx: torch.Tensor, layout, hq: int):
        t, h, s = block_idx.shape
        nb = layout.num_blocks
        past = block_idx[:, :, 1:]
        valid = past >= 0
        tok = torch.arange(t, device=DEV).view(t, 1, 1).expand_as(past)
        hh = torch.arange(h, device=DEV).view(1, h, 1).expand_as(past)
        sl = torch.arange(1, s, device=DEV).view(1, 1, s - 1).expand_as(past)
        key = (past.long() * h + hh)[valid]
        self.tok, self.h, self.slot = tok[valid], hh[valid], sl[valid]
        order = torch.sort(key, stable=True).indices
        key, self.tok, self.h, self.slot = key[order], self.tok[order], self.h[order], self.slot[order]
        counts = torch.bincount(key, minlength=nb * h)
        offs = torch.cumsum(counts, 0) - counts
        rank = torch.arange(key.numel(), device=DEV) - offs[key]
        rows = counts.view(nb, h).max(1).values
        base = torch.cumsum(rows, 0) - rows
        self.row = base[key // h] + rank
        self.rows_host = rows.tolist()
        self.base_host = base.tolist()
        self.total = int(sum(self.rows_host))
        self.nb = nb
        bs = layout.block_start.tolist()
        be = layout.block_end.tolist()
        self.kcu = bs + [be[-1]]


def calls_for(g: Gathered, hq: int, hkv: int, max_rows: int | None = None):
    """Split key blocks into consecutive ranges whose ragged buffers stay under int32 offsets."""
    out, j0 = [], 0
    lim_rows = INT_LIMIT // (hq * D)
    if max_rows:
        lim_rows = min(lim_rows, max_rows)
    lim_keys = INT_LIMIT // (hkv * D)
    while j0 < g.nb:
        j1, r = j0, 0
        while j1 < g.nb and r + g.rows_host[j1] <= lim_rows and g.kcu[j1 + 1] - g.kcu[j0] <= lim_keys:
            r += g.rows_host[j1]
            j1 += 1
        if j1 == j0:
            raise RuntimeError("one block's rows exceed the int32 limit")
        out.append((j0, j1))
        j0 = j1
    return out


def gather_forward(q, k, v, layout, block_idx, scale, max_rows=None, merge=True, times=None):
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = Gathered(block_idx, layout, hq)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    ev[0].record()
    # own blocks: ragged causal, one sequence per block
    kcu = torch.tensor(g.kcu, dtype=torch.int32, device=DEV)
    res = rag_f(q, k, v, None, kcu, kcu, layout.chunk_size, layout.chunk_size, True, 0.0, True, False,
                scale=scale)
    o_own, lse_own = res[0], res[1]
    ev[1].record()
    og = torch.empty(g.total, hq, d, device=DEV, dtype=q.dtype)
    lg = torch.empty(g.total, hq, device=DEV, dtype=torch.float32)
    qg = torch.zeros(g.total, hq, d, device=DEV, dtype=q.dtype)
    qg[g.row, g.h] = q[g.tok, g.h]
    ev[2].record()
    for j0, j1 in calls_for(g, hq, hkv, max_rows):
        r0 = g.base_host[j0]
        r1 = g.base_host[j1] if j1 < g.nb else g.total
        if r1 == r0:
            continue
        qcu = torch.tensor([b - r0 for b in g.base_host[j0:j1]] + [r1 - r0], dtype=torch.int32, device=DEV)
        k0, k1 = g.kcu[j0], g.kcu[j1]
        kc = torch.tensor([x - k0 for x in g.kcu[j0:j1 + 1]], dtype=torch.int32, device=DEV)
        mq = max(g.rows_host[j0:j1])
        r = rag_f(qg[r0:r1], k[k0:k1], v[k0:k1], None, qcu, kc, mq, layout.chunk_size, True, 0.0, False, False,
                  scale=scale)
        og[r0:r1] = r[0]
        lg[r0:r1] = r[1].view(r1 - r0, hq)
    ev[3].record()
    if not merge:
        ev[4].record()
        if times is not None:
            torch.cuda.synchronize()
            times.update(own=ev[0].elapsed_time(ev[1]), gather=ev[1].elapsed_time(ev[2]),
                         past=ev[2].elapsed_time(ev[3]))
        return None
    s = block_idx.shape[2]
    lse_all = torch.full((t, hq, s), -math.inf, device=DEV)
    lse_all[:, :, 0] = lse_own.view(t, hq)
    lse_all[g.tok, g.h, g.slot] = lg[g.row, g.h]
    m = torch.logsumexp(lse_all, -1)
    w = torch.exp(lse_all - m[..., None])
    out = w[:, :, 0, None] * o_own.float()
    out.index_put_((g.tok, g.h), w[g.tok, g.h, g.slot, None] * og[g.row, g.h].float(), accumulate=True)
    ev[4].record()
    if times is not None:
        torch.cuda.synchronize()
        times.update(own=ev[0].elapsed_time(ev[1]), gather=ev[1].elapsed_time(ev[2]),
                     past=ev[2].elapsed_time(ev[3]), merge=ev[3].elapsed_time(ev[4]))
    return out.to(q.dtype), m, g, kcu


def gather_backward(dout, q, k, v, out, m, g, kcu, layout, scale):
    """dQ, dK, dV through cuDNN's backward with the merged output and natural-log LSE ``m [T, H]``."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    lse_own = m.view(t, hq, 1).contiguous()
    seed = torch.empty(0, device=DEV)
    dq, dk, dv = rag_b(dout, q, k, v, out, lse_own, seed, seed, None, kcu, kcu, layout.chunk_size,
                       layout.chunk_size, 0.0, True, scale=scale)
    dq, dk, dv = dq.float(), dk.float(), dv.float()
    def rows(x):
        b = torch.zeros(g.total, hq, *x.shape[2:], device=DEV, dtype=x.dtype)
        b[g.row, g.h] = x[g.tok, g.h]
        return b

    qg, og, dog = rows(q), rows(out), rows(dout)
    lg = torch.zeros(g.total, hq, device=DEV)
    lg[g.row, g.h] = m[g.tok, g.h]
    for j0, j1 in calls_for(g, hq, hkv):
        r0 = g.base_host[j0]
        r1 = g.base_host[j1] if j1 < g.nb else g.total
        if r1 == r0:
            continue
        qcu = torch.tensor([b - r0 for b in g.base_host[j0:j1]] + [r1 - r0], dtype=torch.int32, device=DEV)
        k0, k1 = g.kcu[j0], g.kcu[j1]
        kc = torch.tensor([x - k0 for x in g.kcu[j0:j1 + 1]], dtype=torch.int32, device=DEV)
        mq = max(g.rows_host[j0:j1])
        a, b_, c = rag_b(dog[r0:r1], qg[r0:r1], k[k0:k1], v[k0:k1], og[r0:r1],
                         lg[r0:r1].view(r1 - r0, hq, 1).contiguous(), seed, seed, None, qcu, kc, mq,
                         layout.chunk_size, 0.0, False, scale=scale)
        dk[k0:k1] += b_.float()
        dv[k0:k1] += c.float()
        sel = (g.row >= r0) & (g.row < r1)
        dq.index_put_((g.tok[sel], g.h[sel]), a.float()[g.row[sel] - r0, g.h[sel]], accumulate=True)
    return dq, dk, dv


def gather_forward_dense(q, k, v, layout, block_idx, scale, streams=1, times=None):
    """Own blocks as one batched causal cuDNN call (equal full blocks), past blocks as one dense non-causal
    call per key block on the gathered rows. No merge (timing of the attention work)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    c = layout.chunk_size
    nbk = t // c
    g = Gathered(block_idx, layout, hq)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    ev[0].record()
    qv, kv, vv = (x[: nbk * c].view(nbk, c, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    res = dense(qv, kv, vv, None, True, 0.0, True, False, scale=scale)
    ev[1].record()
    qg = torch.zeros(g.total, hq, d, device=DEV, dtype=q.dtype)
    qg[g.row, g.h] = q[g.tok, g.h]
    og = torch.empty(g.total, hq, d, device=DEV, dtype=q.dtype)
    lg = torch.empty(hq, g.total, device=DEV, dtype=torch.float32)
    ev[2].record()
    main = torch.cuda.current_stream()
    side = [torch.cuda.Stream() for _ in range(streams - 1)]
    for st in side:
        st.wait_stream(main)
    for j in range(g.nb):
        n = g.rows_host[j]
        if not n:
            continue
        r0 = g.base_host[j]
        k0, k1 = g.kcu[j], g.kcu[j + 1]
        qj = qg[r0:r0 + n].transpose(0, 1)[None]
        kj, vj = (x[k0:k1].transpose(0, 1)[None] for x in (k, v))
        st = main if not side or j % streams == 0 else side[j % streams - 1]
        with torch.cuda.stream(st):
            r = dense(qj, kj, vj, None, True, 0.0, False, False, scale=scale)
            og[r0:r0 + n] = r[0][0].transpose(0, 1)
            lg[:, r0:r0 + n] = r[1].view(hq, n)
    for st in side:
        main.wait_stream(st)
    ev[3].record()
    if times is not None:
        torch.cuda.synchronize()
        times.update(own=ev[0].elapsed_time(ev[1]), gather=ev[1].elapsed_time(ev[2]),
                     past=ev[2].elapsed_time(ev[3]), calls=sum(1 for x in g.rows_host if x))
    return res, og, lg, g


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------


def check_small():
    torch.manual_seed(0)
    for (t, hq, hkv, chunk, topk) in [(4096, 2, 2, 512, 3), (3000, 4, 2, 256, 4), (4096, 4, 1, 512, 8)]:
        q, k, v = rnd(t, hq, D), rnd(t, hkv, D), rnd(t, hkv, D)
        layout = cached_layout([0, t], chunk, DEV)
        bi = triton_moba.select_blocks(q, k, layout, topk)
        scale = D ** -0.5
        out, m, g, kcu = gather_forward(q, k, v, layout, bi, scale)
        qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
        ref, _ = naive.moba_attention_naive(qf, kf, vf, layout, topk, scale)
        dout = rnd(t, hq, D)
        ref.backward(dout.float())
        tri = triton_moba.moba_attention_triton(q, k, v, layout, topk, scale)
        # what bf16 torch itself shows against the float32 reference: the tolerance rule's yardstick
        qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
        own, _ = naive.moba_attention_naive(qb, kb, vb, layout, topk, scale)
        dq, dk, dv = gather_backward(dout, q, k, v, out, m, g, kcu, layout, scale)
        emit(what="check", shape=[t, hq, hkv, chunk, topk], out_gather=rel(out, ref), out_triton=rel(tri, ref),
             dq=rel(dq, qf.grad), dk=rel(dk, kf.grad), dv=rel(dv, vf.grad))


def rates():
    scale = D ** -0.5
    for s in (1 << 20,):
        q, k, v = rnd(1, 1, s, D), rnd(1, 1, s, D), rnd(1, 1, s, D)
        ms = timed(lambda: dense(q, k, v, None, False, 0.0, True, False, scale=scale), 2)
        emit(what="dense_causal_fwd", S=s, ms=ms, tflops=tflops(s * s / 2, ms))
        del q, k, v
    c = 163840
    for nq in (c, 4 * c):
        q, k, v = rnd(1, 1, nq, D), rnd(1, 1, c, D), rnd(1, 1, c, D)
        ms = timed(lambda: dense(q, k, v, None, True, 0.0, False, False, scale=scale), 2)
        emit(what="dense_noncausal_fwd", nq=nq, nk=c, ms=ms, tflops=tflops(nq * c, ms))
        r = dense(q, k, v, None, True, 0.0, False, False, scale=scale)
        do = torch.randn_like(r[0])
        msb = timed(lambda: dense_b(do, q, k, v, r[0], r[1], r[6], r[7], None, r[2], r[3], r[4], r[5], 0.0, False,
                                    scale=scale), 2)
        emit(what="dense_noncausal_bwd", nq=nq, nk=c, ms=msb, tflops=tflops(nq * c, msb, True))
        del q, k, v, r, do
    for b, c in ((8, 163840), (256, 4096)):
        q, k, v = rnd(b, 1, c, D), rnd(b, 1, c, D), rnd(b, 1, c, D)
        ms = timed(lambda: dense(q, k, v, None, True, 0.0, True, False, scale=scale), 2)
        emit(what="dense_batched_causal_fwd", B=b, C=c, ms=ms, tflops=tflops(b * c * c / 2, ms))
        del q, k, v


def whole(name, t, hq, hkv, chunk, topk, dense_ms_per_S2=None, max_rows=None, n=2):
    torch.manual_seed(1)
    scale = D ** -0.5
    q, k, v = rnd(t, hq, D), rnd(t, hkv, D), rnd(t, hkv, D)
    layout = cached_layout([0, t], chunk, DEV)
    bi = triton_moba.select_blocks(q, k, layout, topk)
    pairs = None
    # attended pairs: own block causal + full past blocks
    nb = layout.num_blocks
    own = nb * chunk * (chunk + 1) / 2
    past = float((bi[:, :, 1:] >= 0).sum()) * chunk
    pairs = own + past
    ms_tri = timed(lambda: triton_moba.moba_attention_triton(q, k, v, layout, topk, scale), n)
    times = {}
    gather_forward(q, k, v, layout, bi, scale, max_rows=max_rows, merge=False, times=times)
    ms_g = timed(lambda: gather_forward(q, k, v, layout, bi, scale, max_rows=max_rows, merge=False), n)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gather_forward(q, k, v, layout, bi, scale, max_rows=max_rows, merge=False)
    cpu = time.perf_counter() - t0
    torch.cuda.synchronize()
    times2 = {}
    gather_forward(q, k, v, layout, bi, scale, max_rows=max_rows, merge=False, times=times2)
    emit(what="whole_fwd", name=name, shape=[t, hq, hkv, chunk, topk], pairs=pairs, triton_ms=ms_tri,
         triton_tflops=tflops(pairs * hq, ms_tri), gather_nomerge_ms=ms_g, parts=times2,
         cudnn_parts_tflops=tflops(pairs * hq, times2["own"] + times2["past"]), host_s_per_call=cpu)
    if t <= (1 << 21):
        outs = {}
        ms_m = timed(lambda: outs.__setitem__("o", gather_forward(q, k, v, layout, bi, scale, max_rows=max_rows)),
                     1)
        tri = triton_moba.moba_attention_triton(q, k, v, layout, topk, scale)
        emit(what="whole_fwd_merge", name=name, torch_merge_ms=ms_m, rel_vs_triton=rel(outs["o"][0], tri))


def whole_dense(name, t, hq, hkv, chunk, topk, n=1, streams=(1, 2)):
    torch.manual_seed(1)
    scale = D ** -0.5
    q, k, v = rnd(t, hq, D), rnd(t, hkv, D), rnd(t, hkv, D)
    layout = cached_layout([0, t], chunk, DEV)
    bi = triton_moba.select_blocks(q, k, layout, topk)
    nb = layout.num_blocks
    pairs = nb * chunk * (chunk + 1) / 2 + float((bi[:, :, 1:] >= 0).sum()) * chunk
    ms_tri = timed(lambda: triton_moba.moba_attention_triton(q, k, v, layout, topk, scale), n)
    rec = dict(what="whole_dense", name=name, shape=[t, hq, hkv, chunk, topk], pairs=pairs, triton_ms=ms_tri,
               triton_tflops=tflops(pairs * hq, ms_tri))
    for ns in streams:
        times = {}
        gather_forward_dense(q, k, v, layout, bi, scale, ns)  # warm-up: graph builds
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gather_forward_dense(q, k, v, layout, bi, scale, ns, times=times)
        rec[f"s{ns}_wall_ms"] = (time.perf_counter() - t0) * 1e3
        rec[f"s{ns}_parts"] = times
        rec[f"s{ns}_tflops_attn"] = tflops(pairs * hq, times["own"] + times["past"])
        rec[f"s{ns}_ms"] = times["own"] + times["past"] + times["gather"]
    emit(**rec)


def main():
    which = sys.argv[1:] or ["check", "rates", "whole"]
    emit(what="env", torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
         gpu=torch.cuda.get_device_name(), commit=os.environ.get("MOBA_GIT_COMMIT"))
    for w in which:
        try:
            if w == "check":
                check_small()
            elif w == "rates":
                rates()
            elif w == "whole":
                whole("paper-128k-h8", 1 << 17, 8, 8, 4096, 12)
                whole("paper-1m-h1", 1 << 20, 1, 1, 4096, 12)
                whole("10m", 10 << 20, 1, 1, (10 << 20) // 64, 3, n=1)
            elif w == "dense":
                q = rnd(1, 1, 1 << 20, D)
                ms = timed(lambda: dense(q, q, q, None, False, 0.0, True, False, scale=D**-0.5), 2)
                emit(what="dense_causal_fwd", S=1 << 20, ms=ms, tflops=tflops((1 << 40) / 2, ms))
                del q
                whole_dense("10m", 10 << 20, 1, 1, (10 << 20) // 64, 3)
                whole_dense("4m-c65536-k3", 4 << 20, 1, 1, 65536, 3)
                whole_dense("2m-c32768-k4-h4", 2 << 20, 4, 4, 32768, 4)
                whole_dense("2m-c16384-k8-h2", 2 << 20, 2, 2, 16384, 8)
                q = rnd(1, 1, 2 << 20, D)
                ms = timed(lambda: dense(q, q, q, None, False, 0.0, True, False, scale=D**-0.5), 1)
                emit(what="dense_causal_fwd", S=2 << 20, ms=ms, tflops=tflops((4 << 40) / 2, ms))
                del q
            elif w == "whole10m":
                whole("10m", 10 << 20, 1, 1, (10 << 20) // 64, 3, n=1)
        except Exception as e:  # noqa: BLE001 - a probe: record and go on
            emit(what="error", section=w, err=repr(e)[:500], tb=traceback.format_exc()[-1500:])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
