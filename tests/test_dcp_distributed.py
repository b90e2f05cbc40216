"""Issue 20 item 11 on 2 gloo ranks: ``--ckpt_format=dcp`` under DDP (rank 0 writes in the background) and FSDP2
(every rank writes its own shards, nothing gathered); a resumed run ends bit-identical to a straight one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).parent.parent


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_dcp_resume_is_bit_identical(tmp_path, demo_dir, mode):
    common = [f"--data={demo_dir}", "--img_size=32", "--patch_size=4", "--batch_size=4", "--log_every=1",
              "--ckpt_every=2", "--progress=false", "--precision=fp32", "--num_workers=0", "--ckpt_format=dcp",
              f"--fsdp={mode == 'fsdp'}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun(*common, f"--output_dir={straight}", "--max_steps=4")
    _torchrun(*common, f"--output_dir={resumed}", "--max_steps=2")
    r = _torchrun(*common, f"--output_dir={resumed}", "--max_steps=4", "--resume=auto")
    assert "resumed from checkpoint-00000002.dcp" in r.stdout
    a, b = (load_checkpoint(d / "checkpoint-00000004.dcp") for d in (straight, resumed))
    for part in ("model", "optimizer"):
        ta, tb = (dict(_tensors(x[part])) for x in (a, b))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{part} {k} differs after resume ({mode})"
    assert a["data"] == b["data"] and len(a["rng"]) == 2
    shards = sorted(p.name for p in (straight / "checkpoint-00000004.dcp").glob("*.distcp"))
    # FSDP: each rank wrote the shards it holds; DDP: rank 0 alone wrote the (replicated) state.
    assert [s.split("_")[2] for s in shards] == (["0", "1"] if mode == "fsdp" else ["0"]), shards
    assert all(type(v) is torch.Tensor for v in a["model"].values())  # consolidated full tensors on load
    from fastmae import mae_vit_tiny

    mae_vit_tiny(img_size=32, patch_size=4).load_state_dict(a["model"], strict=True)


def _tensors(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def test_fsdp_dcp_scancel_saves_every_ranks_shards_and_exits_cleanly(tmp_path, demo_dir, fresh_env):
    """SIGTERM to the whole job (SLURM's scancel) under FSDP + dcp: each rank writes its shards of the agreed step,
    blocking, inside torchrun's grace period, and the log line says what the save cost per GB."""
    from test_faults_preempt import TINY, _finish, _scancel, _start, _wait_for_steps

    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--batch_size=4", "--num_workers=0", "--fsdp=true",
           "--ckpt_format=dcp"]
    p = _start(cmd, fresh_env)
    _wait_for_steps(p, out, 3)
    _scancel(p.pid)
    stdout, err = _finish(p)
    assert "forcefully" not in err and "ChildFailedError" not in err, err[-3000:]
    folders = sorted(out.glob("checkpoint-*.dcp"))
    assert len(folders) == 1, folders
    ckpt = load_checkpoint(folders[0])
    line = next(x for x in stdout.splitlines() if "SIGTERM: saved" in x)
    assert f"at step {ckpt['step']}; exiting (checkpoint " in line and "s/GB" in line, line
    assert sorted(s.name.split("_")[2] for s in folders[0].glob("*.distcp")) == ["0", "1"]
    saved = {f.name: f.read_text().strip() for f in (out / "preempted").iterdir()}
    assert saved == {"rank-0": str(ckpt["step"]), "rank-1": str(ckpt["step"])}, saved
