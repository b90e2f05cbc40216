"""Issue 11, items 3-6 and 8 through the training command: one run per folder, verified resume with
fallback, crafted or foreign checkpoints, disk full, metrics and config.json after a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import TINY, one_error_line

from fastmae.pretrain import cli_main

ROOT = Path(__file__).parent.parent


def run(out: Path, data: Path, capsys, *extra: str) -> tuple[int, str]:
    code = cli_main([f"--data={data}", f"--output_dir={out}", *TINY, *extra])
    return code, capsys.readouterr().err


# ---- item 3: one run per folder ---------------------------------------------------------------------------

def test_fresh_run_refuses_a_folder_with_checkpoints(run_dir, demo_dir, capsys):
    files = lambda: {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}  # noqa: E731
    before = files()
    code, err = run(run_dir, demo_dir, capsys, "--max_steps=6")
    assert code == 2
    assert one_error_line(err) == (f"fastmae: error: {run_dir} already holds checkpoints of another run; "
                                   "use --resume=auto or a new --output_dir")
    assert files() == before, "the refused run touched the folder"


def test_second_run_in_a_busy_folder_is_refused(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "busy"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY]
    first = subprocess.Popen([*cmd, "--max_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=fresh_env, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--max_steps=2", "--resume=auto"], capture_output=True, text=True, env=fresh_env,
                                cwd=ROOT, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        line = one_error_line(second.stderr)
        assert f"{out} is in use by another run (pid {first.pid} on " in line
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    # The lock went with the first run: the folder resumes.
    r = subprocess.run([*cmd, "--max_steps=1", "--resume=auto", "--epochs=1"], capture_output=True, text=True,
                       env=fresh_env, cwd=ROOT, timeout=240)
    assert r.returncode in (0, 2) and "in use by another run" not in r.stderr


def test_lock_is_released_by_sigkill(tmp_path):
    from fastmae.engine.runlock import RunFolderBusy, RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from fastmae.engine.runlock "
         f"import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on "):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):
        pass


# ---- item 4: verified checkpoints, resume falls back -------------------------------------------------------

def test_resume_auto_skips_a_damaged_newest_checkpoint(run_dir, demo_dir, capsys):
    newest = run_dir / "checkpoint-00000004.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the weights: torch.load would not notice
    newest.write_bytes(bytes(data))
    code, err = run(run_dir, demo_dir, capsys, "--max_steps=6", "--resume=auto")
    assert code == 0, err[-3000:]
    assert "skipping checkpoint-00000004.pt" in err and "resuming from checkpoint-00000002.pt" in err
    assert torch.load(run_dir / "checkpoint-00000006.pt", weights_only=True)["step"] == 6


# ---- items 5 and 6: crafted and foreign checkpoints -------------------------------------------------------

def _crafted(run_dir: Path, tmp_path: Path, **changes) -> Path:
    ckpt = torch.load(run_dir / "checkpoint-00000004.pt", weights_only=True)
    path = tmp_path / "crafted.pt"
    torch.save({**ckpt, **changes}, path)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda ck, d: _crafted(ck, d, step=-5), "step must be a non-negative integer, got -5"),
        (lambda ck, d: _crafted(ck, d, step=3), "does not match step 3"),
        (lambda ck, d: _crafted(ck, d, step=500, epoch=12), "beyond this run's 6 steps"),
        (lambda ck, d: _crafted(ck, d, data={"epoch": 0, "step": 99}), "does not match step 4"),
        (lambda ck, d: _official(ck, d), "not a fastmae training checkpoint"),
        (lambda ck, d: _saved(d, [torch.zeros(2)]), "holds a list, expected a dict"),
        (lambda ck, d: _saved(d, {**torch.load(ck / "checkpoint-00000004.pt", weights_only=True),
                                  "model": {"cls_token": "x"}}), "non-tensor entries (cls_token)"),
    ],
)
def test_bad_resume_file_is_one_line(run_dir, demo_dir, tmp_path, capsys, make, message):
    path = make(run_dir, tmp_path)
    config_before = (run_dir / "config.json").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    code, err = run(run_dir, demo_dir, capsys, "--max_steps=6", f"--resume={path}")
    assert code == 2
    assert message in one_error_line(err)
    # item 8: a failed resume leaves the run's files as they were
    assert (run_dir / "config.json").read_text() == config_before
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before


def _official(run_dir: Path, tmp_path: Path) -> Path:
    sd = torch.load(run_dir / "checkpoint-00000004.pt", weights_only=True)["model"]
    return _saved(tmp_path, {"model": sd})


def _saved(tmp_path: Path, obj) -> Path:
    path = tmp_path / "file.pth"
    torch.save(obj, path)
    return path


def test_failed_resume_into_another_architecture_keeps_config_json(run_dir, demo_dir, capsys):
    config_before = (run_dir / "config.json").read_text()
    code, err = run(run_dir, demo_dir, capsys, "--max_steps=6", "--resume=auto", "--patch_size=8")
    assert code == 2 and "patch_size 4 -> 8 changes what the run learns" in err  # issue 24: refused up front
    code, err = run(run_dir, demo_dir, capsys, "--max_steps=6", "--resume=auto", "--patch_size=8", "--allow_config_change")
    assert code == 2 and "shape mismatch" in err
    assert (run_dir / "config.json").read_text() == config_before


# ---- item 6: disk full ------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_loses_nothing(tmp_path, demo_dir, capsys, monkeypatch):
    from fastmae.engine.checkpoint import load_checkpoint

    out = tmp_path / "full"
    monkeypatch.setenv("FASTMAE_FAULT", "disk_full@4")
    code, err = run(out, demo_dir, capsys, "--max_steps=6")
    assert code == 1
    assert one_error_line(err) == (f"fastmae: error: no space left on device: {out}/checkpoint-00000004.pt "
                                   "(earlier checkpoints are intact)")
    assert load_checkpoint(out / "checkpoint-00000002.pt")["step"] == 2
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-00000004.pt").exists()


# ---- item 8: metrics after a resume -----------------------------------------------------------------------

def test_metrics_after_resume_have_each_step_once(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "m"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=7"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**fresh_env, "FASTMAE_FAULT": "after_step@5"},
                            cwd=ROOT, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    r = subprocess.run([*cmd, "--resume=auto"], capture_output=True, text=True, env=fresh_env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    assert [r for r in rows if "event" in r][0]["event"] == "resume"
    assert [r.get("event", r["step"]) for r in rows][4] == "resume" and rows[4]["step"] == 4
