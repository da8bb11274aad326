"""One process per GPU through torchrun: process group, device, DDP / FSDP2 wrapping, reductions."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from moba_cli.errors import MobaError


@dataclass
class Dist:
    """Where this process stands: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    enabled: bool  # a process group is running

    @property
    def main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_choice: str, backend: str = "auto") -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else a single process."""
    want_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(0, 1, 0, device, False)
    import torch.distributed as dist

    if not dist.is_initialized():
        name = backend if backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(name, device_id=device if name == "nccl" else None)
    return Dist(rank, world, local, device, True)


def teardown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, d: Dist, bf16: bool) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per decoder layer and the root), when several processes run."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, d: Dist) -> Any:
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that runs ``moba <argv>`` on ``gpus`` processes of this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "moba_cli", *argv]


def relaunch(gpus: int, argv: list[str]) -> int:
    """Run this command again under torchrun with ``gpus`` processes; returns its exit code."""
    import subprocess

    if not torch.cuda.is_available():
        raise MobaError("distributed.gpus > 1 needs CUDA GPUs; this machine has none")
    return subprocess.call(torchrun_command(gpus, argv))
