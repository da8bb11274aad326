"""The prefill and decode kernels must compile for the H200 (sm_90), checked on a CPU machine (see compile_sm90.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# Prefill: 2 (dtype, D) settings x 9 kernels (sort gate; grouped gate at 8 and 16 kept groups; dQ with EVEN
# on and off; dK/dV with EVEN on and off, each with dQ fused or not), the block-mean
# kernel, and the distinct launches of compile_sm90.forward_launches() (4 forward settings x TMA on/off x
# first / merging / last slot, plus the one-slot launch, TMA on/off, at the first setting), the lean
# forward's counting sort (compile_sm90.slot_schedule_launches(): 2 passes x block lists aligned to 16 bytes
# or not x int16 without and with a skip).
PREFILL = 2 * 9 + 1 + 4 * 2 * 3 + 2 + 2 * 2 * 2 + 4  # ... + the Gluon backward (2 dtypes x EVEN)
# Decode: the distinct launches of compile_sm90.decode_launches() (identical launches compile once).
DECODE = 37
DECODE_KERNELS = ("_gate_tile_kernel", "_gate_merge_kernel", "_attn_kernel", "_combine_kernel")


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "compile_sm90.py")], env=env, capture_output=True, text=True,
                          timeout=1800)  # minutes on a busy 2-core CI machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if " ok," in line]
    from moba_cli.ops.moba.gluon_compat import gluon_supported

    gluon = 4 if gluon_supported()[0] else 0  # Triton 3.6 to 3.8 have the Gluon API the backward needs
    assert len(lines) == PREFILL - 4 + gluon + DECODE, proc.stdout
    assert sum(line.startswith("gluon ") for line in lines) == gluon, proc.stdout
    for name in (*DECODE_KERNELS, "_gate_grouped_kernel", "_slot_count_kernel"):
        assert any(line.startswith(name + " ") for line in lines), f"{name} was never compiled"
    assert any(line.startswith("_fwd_kernel ") and "'DESC': True" in line for line in lines), "no TMA forward"
