"""Checkpoints: ``checkpoints/step-N/`` (a Hugging Face model directory plus the training state) and a
``checkpoints/latest`` pointer. Each step folder is written under a temporary name and renamed, then the
pointer is replaced atomically, so a run killed at any moment resumes from the last complete checkpoint.

Training state: ``trainer.pt`` (step, optimizer, scheduler, on rank 0) and ``rank-R.pt`` (the data
loader and RNG states of rank R).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moba_cli.errors import MobaError
from moba_cli.train.distributed import Dist, barrier, broadcast_object

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (works for plain, DDP-inner and FSDP2 modules)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         loader: Any, tokenizer: Any, d: Dist, keep: int, config_extra: dict[str, Any] | None = None) -> Path:
    """Write ``step-<step>/`` (every rank takes part), point ``latest`` at it, drop old ones beyond ``keep``.

    ``config_extra``: keys replaced in the saved config.json (what a later load should see, e.g. the
    recipe's MoBA backend rather than this machine's choice).
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    model_sd, optim_sd = _full_state(model, optimizer)
    if d.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(d)
    if d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the run has its own progress bar
        model.save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        if config_extra:
            import json

            cfg = json.loads((tmp / "config.json").read_text())
            cfg.update(config_extra)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
    torch.save({"loader": loader.state_dict(), "rng": rng_state()}, tmp / f"rank-{d.rank}.pt")
    barrier(d)
    if d.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep, final)
    barrier(d)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise MobaError(f"{pointer} points at {path.name}, which is incomplete; remove the pointer to restart")
    return path


def resolve(path: str | Path) -> Path:
    """A model directory from a checkpoint folder, a run folder (its latest checkpoint) or ``checkpoints/``."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        pointer = root / LATEST
        if pointer.is_file():
            target = root / pointer.read_text().strip()
            if (target / "config.json").is_file():
                return target
    raise MobaError(f"{path} is neither a model directory (config.json) nor a run folder with a checkpoint")


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any,
         d: Dist) -> int:
    """Restore everything saved by :func:`save` into live objects. Returns the step to continue from."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    files = sorted(path.glob("*.safetensors"))
    model_sd: dict[str, torch.Tensor] = {}
    for f in files:
        model_sd.update(load_file(f))
    if not model_sd:
        raise MobaError(f"checkpoint {path} has no safetensors weights")
    # save_pretrained drops tied duplicates; the model's own names are what set_state_dict needs.
    own = {k for k in model.state_dict()}
    model_sd = {k: v for k, v in model_sd.items() if k in own}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False, strict=False)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=trainer["optimizer"],
                   options=opts)
    scheduler.load_state_dict(trainer["scheduler"])
    rank_file = path / f"rank-{d.rank}.pt"
    if not rank_file.is_file():
        raise MobaError(f"{path} was written by fewer processes (no {rank_file.name}); resume with the same "
                        "number of GPUs")
    mine = torch.load(rank_file, map_location="cpu", weights_only=False)
    loader.load_state_dict(mine["loader"])
    set_rng_state(mine["rng"])
    return int(broadcast_object(trainer["step"], d))
