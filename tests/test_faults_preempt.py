"""Issue 11, item 2: preemption saves the current step and exits 0, whether SIGTERM reaches the main process,
its whole process group (SLURM, scancel: DataLoader workers included) or torchrun's ranks; ranks agree
on the step they save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
TINY = ["--img_size=32", "--patch_size=4", "--progress=false", "--precision=fp32", "--max_steps=100000",
        "--log_every=1", "--ckpt_every=100000"]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own process group, as under a batch scheduler


def _wait_for_steps(p: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"loss"') >= n:
            return
        if p.poll() is not None:
            break
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"the run did not reach {n} steps: {p.communicate()[1][-3000:]}")


def _descendants(pid: int) -> list[int]:
    r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(x) for x in r.stdout.split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [p.pid, *_descendants(p.pid)]:  # torchrun starts each rank in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = p.communicate()
        raise AssertionError(f"no exit {timeout} s after SIGTERM (hung):\n{err[-3000:]}") from None


def _only_checkpoint(out: Path) -> dict:
    ckpts = sorted(out.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1, ckpts
    return torch.load(ckpts[0], weights_only=True)


@pytest.mark.parametrize("target", ["main", "group"])
def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, demo_dir, fresh_env, target):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--batch_size=8",
           "--num_workers=2"]
    p = _start(cmd, fresh_env)
    _wait_for_steps(p, out, 3)
    if target == "group":
        os.killpg(p.pid, signal.SIGTERM)  # the DataLoader workers get it too
    else:
        p.send_signal(signal.SIGTERM)
    stdout, err = _finish(p)
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    step = _only_checkpoint(out)["step"]
    assert step >= 3 and f"at step {step}; exiting" in stdout
    logged = (out / "metrics.jsonl").read_text().count('"loss"')
    assert logged == step, "the save is of the step the run had reached, not an older one"


def _torchrun(out: Path, demo_dir: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--batch_size=4", "--num_workers=1"]
    return _start(cmd, env)


def _ranks(launcher_pid: int) -> list[int]:
    r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _scancel(launcher_pid: int) -> None:
    """SIGTERM to every process of the job at once, as SLURM does: torchrun starts each rank in a session
    (process group) of its own, so the launcher's group and each rank's group (rank + DataLoader workers)."""
    groups = {os.getpgid(pid) for pid in [launcher_pid, *_ranks(launcher_pid)]}
    for g in groups:
        os.killpg(g, signal.SIGTERM)


def test_torchrun_process_group_sigterm_every_rank_saves_the_same_step(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "ddp"
    p = _torchrun(out, demo_dir, fresh_env)
    _wait_for_steps(p, out, 3)
    _scancel(p.pid)
    stdout, err = _finish(p)
    # torchrun itself re-raises the signal after its ranks have stopped (its exit status is its own);
    # the ranks must have stopped cleanly within its grace period, not been SIGKILLed by it.
    assert "forcefully" not in err and "ChildFailedError" not in err, err[-3000:]
    ckpt = _only_checkpoint(out)
    assert len(ckpt["rng"]) == 2, "both ranks took part in the save (a collective at the agreed step)"
    assert f"at step {ckpt['step']}; exiting" in stdout
    # What a launcher reads instead of torchrun's exit status (fastmae submit's batch script: exit 0).
    saved = {p.name: p.read_text().strip() for p in (out / "preempted").iterdir()}
    assert saved == {"rank-0": str(ckpt["step"]), "rank-1": str(ckpt["step"])}, saved


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "one"
    p = _torchrun(out, demo_dir, fresh_env)
    _wait_for_steps(p, out, 3)
    ranks = _ranks(p.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only one rank hears it: the vote carries it to the other
    stdout, err = _finish(p)
    assert p.returncode == 0, err[-3000:]
    ckpt = _only_checkpoint(out)
    assert len(ckpt["rng"]) == 2 and f"at step {ckpt['step']}; exiting" in stdout


def test_sigterm_during_start_up_exits_0_with_nothing_to_save(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "early"
    p = _start([sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--batch_size=8"],
               fresh_env)
    time.sleep(0.5)  # still importing torch
    os.killpg(p.pid, signal.SIGTERM)
    _, err = _finish(p)
    assert p.returncode == 0, err[-3000:]
    assert not list(out.glob("checkpoint-*"))
