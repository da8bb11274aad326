"""Two gloo processes on the CPU (DDP, and FSDP2) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from train_data_fixture import make_data_dir

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"


def _sets(data: Path, out: Path, micro: int, strategy: str = "ddp") -> list[str]:
    return [f"distributed.strategy={strategy}",
            f"data.path={data}", f"log.out={out}", "log.progress=false", "train.steps=4", "train.batch_size=4",
            f"train.micro_batch={micro}", "train.device=cpu", "eval.every=2", "checkpoint.every=0",
            "distributed.backend=gloo"]


def _worker(rank: int, world: int, port: int, data: str, out: str, strategy: str) -> None:

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from moba_cli.train.config import load_recipe
    from moba_cli.train.loop import train

    train(load_recipe(SMOKE, _sets(Path(data), Path(out), micro=1, strategy=strategy)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):

    from moba_cli.train.config import load_recipe
    from moba_cli.train.loop import train

    data = make_data_dir(tmp_path / "data", n_docs=50)
    one = tmp_path / "one"
    # One process: 4 rows a step in 2 micro-batches of 2. Two processes: 2 rows each, in 2 micro-batches of 1
    # (accumulation without gradient sync on the first).
    train(load_recipe(SMOKE, _sets(data, one, micro=2)))
    for strategy in ("ddp", "fsdp"):
        two = tmp_path / strategy
        mp.spawn(_worker, args=(2, _free_port(), str(data), str(two), strategy), nprocs=2, join=True)
        a, b = _metrics(one), _metrics(two)
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5), strategy
        assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4), strategy
        evals_a = [r["val_loss"] for r in a if "val_loss" in r]
        evals_b = [r["val_loss"] for r in b if "val_loss" in r]
        assert len(evals_b) == 2 and evals_b == pytest.approx(evals_a, rel=1e-5), strategy
        params = [json.loads((run / "result.json").read_text())["summary"]["params"] for run in (one, two)]
        assert params[0] == params[1] > 0
        ranks = sorted(p.name for p in (two / "checkpoints" / "step-4").glob("rank-*.pt"))
        assert ranks == ["rank-0.pt", "rank-1.pt"]
