"""The training loop behind ``moba train``: one recipe -> one run folder.

Run folder (``log.out``)::

    recipe.yaml       the resolved recipe (every default filled in)
    metrics.jsonl     one JSON line per logged step: loss, lr, grad_norm, tokens_per_s, mfu, memory,
                      and val_loss / val_loss_by_position / val_copy_loss_first / val_copy_loss_second on
                      evaluation steps
    checkpoints/      step-N/ (Hugging Face directory + training state) and the latest pointer
    result.json       moba-result/1, kind "train": the config, the evaluation records, the summary

The global batch (``train.batch_size`` rows) is the same whatever the number of processes: each rank runs
``batch_size / world`` rows in micro-batches of ``train.micro_batch``, and the loss is normalised by the
global number of loss tokens, so 1 and N processes compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.train import checkpoint as ckpt
from moba_cli.train.config import Recipe
from moba_cli.train.distributed import Dist, all_reduce_sum, broadcast_object, setup, teardown, wrap
from moba_cli.train.losses import copy_losses, copy_probe, evaluate, token_loss
from moba_cli.train.validate import switch_step, validate


def lr_lambda(recipe: Recipe):
    """Multiplier of ``optim.lr`` at a step: linear warm-up, then cosine down to ``min_lr_ratio``."""
    warm, total, floor = recipe.optim.warmup_steps, recipe.train.steps, recipe.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms). Fused on CUDA when ``optim.fused``."""
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = o.fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def attention_at(recipe: Recipe, step: int) -> str:
    at = switch_step(recipe)
    return recipe.attention.switch_to if at is not None and step >= at else recipe.attention.kind


def _resolved_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


RUN_FILES = {"recipe.yaml", "metrics.jsonl", "metrics.tmp", "checkpoints", "result.json", "result.json.tmp"}


def prepare_run_dir(recipe: Recipe, resume: bool) -> Path:
    """The run folder; a started run is only continued with ``resume``, and no other folder's files are touched."""
    run_dir = recipe.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise MobaError(f"log.out {run_dir} is a file, not a folder")
    entries = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if entries - RUN_FILES:
        raise MobaError(f"log.out {run_dir} holds files that are not a moba run's; choose a new or empty folder")
    if entries and not resume:
        raise MobaError(f"{run_dir} already holds a run; pass --resume to continue it or set log.out elsewhere")
    if resume and (run_dir / "recipe.yaml").is_file():
        import yaml

        old = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        new = recipe.to_dict()
        # What may change between a run and its resumption: how it is observed and executed, not what it computes.
        for section, keys in (("train", ("compile", "activation_checkpointing")), ("distributed", ("backend",))):
            for k in keys:
                for d in (old, new):
                    d.get(section, {}).pop(k, None)
        keep_free = {"log", "eval", "checkpoint", "sweep", "description"}
        diff = sorted(k for k in new if k not in keep_free and old.get(k) != new[k])
        if diff:
            raise MobaError(f"--resume: the recipe's {', '.join(diff)} differ from the run in {run_dir}; "
                            "resume with the same recipe")
    return run_dir


def _trim_metrics(path: Path, upto: int) -> None:
    """Keep the lines of steps ``<= upto`` (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if row.get("step", 0) <= upto:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)


def saved_config(recipe: Recipe, model: Any, kind: str) -> dict[str, Any]:
    """config.json keys of a checkpoint: the recipe's MoBA settings (not this machine's backend choice), the
    attention the model was last trained with (so ``from_pretrained`` picks it), and the KV cache on."""
    from moba_cli.integrations import CONFIG_KEY
    from moba_cli.train.model import impl_name, moba_settings

    extra: dict[str, Any] = {CONFIG_KEY: moba_settings(recipe.attention, model.config.num_hidden_layers).to_config(),
                             "use_cache": True}
    if kind == "moba":
        extra["attn_implementation"] = impl_name(kind)
    return extra


def _micro_batches(it: Any, n: int) -> list[Any]:
    return [next(it) for _ in range(n)]


def train(recipe: Recipe, *, resume: bool = False, console: Any = None) -> dict[str, Any]:
    """Train ``recipe`` (see the module docstring). Returns the result dict (also written to result.json).

    Under torchrun every process calls this; only rank 0 writes files other than its own state.
    """
    d = setup(recipe.train.device, recipe.distributed.backend)
    try:
        return _train(recipe, d, resume, console)
    finally:
        teardown(d)


def _train(recipe: Recipe, d: Dist, resume: bool, console: Any) -> dict[str, Any]:
    from moba_cli.integrations import attention_mode
    from moba_cli.train import data as data_mod
    from moba_cli.train.model import build_model, impl_name, model_dims, peak_flops, train_flops_per_token

    validate(recipe, world_size=d.world)
    # Rank 0 alone looks at the folder (before anyone writes to it) and every rank gets its verdict.
    verdict = None
    if d.main:
        try:
            prepare_run_dir(recipe, resume)
        except MobaError as e:
            verdict = str(e)
    verdict = broadcast_object(verdict, d)
    if verdict is not None:
        raise MobaError(verdict)
    run_dir = recipe.run_dir
    t, device = recipe.train, d.device
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and device.type == "cuda" else (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext)

    train_ds = data_mod.TokenDataset(recipe.data.path, "train")
    val_ds = data_mod.TokenDataset(recipe.data.path, "val")
    tokenizer = train_ds.tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    base = build_model(recipe, train_ds.vocab_size, special, device.type).to(device)
    if t.activation_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    model = wrap(base, recipe.distributed.strategy, d, bf16)
    if t.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(base, recipe, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))

    per_rank = t.batch_size // d.world
    micro = t.micro_batch or per_rank
    accum = per_rank // micro
    loader = data_mod.PackedLoader(train_ds, recipe.data.seq_len, micro, t.seed, d.rank, d.world,
                                   pack=recipe.data.pack)
    start = 0
    last = ckpt.latest(run_dir) if resume else None
    if last is not None:
        start = ckpt.load(last, base, optimizer, scheduler, loader, d)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(_resolved_yaml(recipe))
        _trim_metrics(run_dir / "metrics.jsonl", start)
    it = iter(loader)
    val_loader = data_mod.PackedLoader(val_ds, recipe.data.seq_len, micro, 0, d.rank, d.world,
                                       pack=recipe.data.pack, shuffle=False)
    val_it = iter(val_loader)
    val_batches = _micro_batches(val_it, recipe.eval.batches * accum)  # the same rows at every evaluation

    dims = model_dims(base.config)
    vocab = base.config.vocab_size
    seq = recipe.data.seq_len
    peak = peak_flops(device)
    n_params = sum(p.numel() for p in base.parameters())  # FSDP2's DTensors report their global size
    tokens_per_step = t.batch_size * seq
    metrics_path = run_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    progress = _progress(recipe, d, console, start)

    cfg = base.config
    special = {i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if isinstance(i, int)}
    # (rows under 16 tokens have no room for two copies and the filler around them)
    probe = (copy_probe(vocab, seq, recipe.eval.copy_rows, special, cfg.bos_token_id)
             if recipe.eval.copy_rows > 0 and seq >= 16 else None)

    def run_eval(step: int) -> dict[str, Any]:
        kind = attention_at(recipe, max(step - 1, 0))
        with attention_mode(base, impl_name(kind, recipe.attention)):
            ev = evaluate(model, val_batches, recipe.eval.buckets, device, autocast(),
                          lambda x: all_reduce_sum(x, d))
            if probe is not None:  # every rank runs it (FSDP gathers weights in the forward)
                ev.update(copy_losses(model, probe, device, autocast()))
        return {"step": step, "attention": kind, **ev}

    row: dict[str, Any] = {}
    with progress:
        task = progress.add_task("train", total=t.steps, completed=start, tok_s="-", loss="-")
        for step in range(start, t.steps):
            kind = attention_at(recipe, step)
            t0 = time.perf_counter()
            batches = _micro_batches(it, accum)
            count = torch.tensor(float(sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)), device=device)
            global_count = all_reduce_sum(count, d).clamp_min(1.0)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            with attention_mode(base, impl_name(kind, recipe.attention)):
                for i, b in enumerate(batches):
                    last = i == accum - 1
                    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
                        model.set_requires_gradient_sync(last)
                    sync = last or not hasattr(model, "no_sync")  # DDP: all-reduce on the last only
                    with contextlib.nullcontext() if sync else model.no_sync():
                        losses, _ = token_loss(model, b.input_ids.to(device), b.labels.to(device),
                                               b.position_ids.to(device), autocast())
                        total = losses.sum()
                        # DDP averages gradients over ranks, hence the world factor: the sum over the global
                        # batch divided by its token count is the gradient of the global mean loss.
                        (total * d.world / global_count).backward()
                        loss_sum += total.detach().double()
            clip = recipe.optim.grad_clip
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss = (all_reduce_sum(loss_sum, d) / global_count.double()).item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            done = step + 1
            tok_s = tokens_per_step / dt
            flops = train_flops_per_token(dims, vocab, seq, recipe.attention, kind)
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "attention": kind,
                   "tokens": done * tokens_per_step, "tokens_per_s": tok_s, "step_s": dt,
                   "mfu": tok_s * flops / (peak * d.world) if peak else None,
                   "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                   else None}
            is_last = done == t.steps
            if (recipe.eval.every and done % recipe.eval.every == 0) or is_last:
                ev = run_eval(done)
                row.update({k: v for k, v in ev.items() if k.startswith("val")})
                records.append(ev)
            if d.main and (done % recipe.log.every == 0 or is_last or "val_loss" in row):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            progress.update(task, completed=done, tok_s=f"{tok_s:,.0f}", loss=f"{loss:.4f}")
            periodic = recipe.checkpoint.every and done % recipe.checkpoint.every == 0
            if periodic or (is_last and recipe.checkpoint.final):
                ckpt.save(run_dir, done, base, optimizer, scheduler, loader, tokenizer, d, recipe.checkpoint.keep,
                          saved_config(recipe, base, kind))
    if start >= t.steps:  # resumed a finished run: nothing trained, report its last state
        ev = run_eval(t.steps)
        records.append(ev)
        row = {"step": t.steps, **{k: v for k, v in ev.items() if k.startswith("val")}}
    summary = _summary(recipe, run_dir, row, n_params, dims, vocab, tokens_per_step, d)
    result = _write_result(recipe, run_dir, records, summary, d)
    return result


def _summary(recipe: Recipe, run_dir: Path, row: dict[str, Any], n_params: int, dims: Any, vocab: int,
             tokens_per_step: int, d: Dist) -> dict[str, Any]:
    from moba_cli.train.model import train_flops_per_token

    steps = recipe.train.steps
    kind_flops = [train_flops_per_token(dims, vocab, recipe.data.seq_len, recipe.attention,
                                        attention_at(recipe, s)) for s in (0, steps - 1)]
    switch = switch_step(recipe) or steps
    compute = tokens_per_step * (switch * kind_flops[0] + (steps - switch) * kind_flops[1])
    final = ckpt.latest(run_dir)
    return {"final_val_loss": row.get("val_loss"), "final_loss": row.get("loss"),
            "val_loss_by_position": row.get("val_loss_by_position"),
            "val_copy_loss_first": row.get("val_copy_loss_first"),
            "val_copy_loss_second": row.get("val_copy_loss_second"), "params": n_params,
            "non_embedding_params": dims.non_embedding_params(), "tokens": steps * tokens_per_step,
            "compute_flops": compute, "attn": recipe.attention.kind, "size": recipe.model.size,
            "world_size": d.world, "checkpoint": str(final) if final else None}


def _write_result(recipe: Recipe, run_dir: Path, records: list, summary: dict, d: Dist) -> dict[str, Any]:
    from moba_cli.results import make_result, write_result

    result = make_result("train", recipe.to_dict(), records, summary)
    if d.main:
        write_result(result, run_dir / "result.json", run_dir)
    return result


def _progress(recipe: Recipe, d: Dist, console: Any, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"), TimeRemainingColumn(),
        console=console, disable=not (d.main and recipe.log.progress), transient=False,
    )
