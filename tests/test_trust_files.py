"""Issue 24, section 3: files read back never surprise (metrics.jsonl, summary after a kill, checkpoint fields)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae.pretrain import cli_main

ROOT = Path(__file__).parent.parent
TINY = ["--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32",
        "--log_every=1", "--ckpt_every=2", "--keep_ckpts=3", "--tensorboard=false"]
GARBAGE = b'{"step": 1, "loss": 0.5}\n\x00\xff\xfe not json\n{"step": "two", "loss": "x"}\n[1, 2]\n{"step": 3, "loss'


def run(out: Path, data: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli_main([f"--data={data}", f"--output_dir={out}", *TINY, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def loss_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("four") / "run"
    assert cli_main([f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=4"]) == 0
    return out


@pytest.fixture
def run_dir(four_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    return out


def test_garbage_metrics_never_cost_a_fresh_run(tmp_path, demo_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_bytes(GARBAGE)  # a folder whose earlier run died before any checkpoint
    code, _, err = run(out, demo_dir, capsys, "--max_steps=3")
    assert code == 0, err[-3000:]
    assert "unreadable line" in err
    assert (out / "summary.json").is_file() and loss_steps(out) == [1, 2, 3]


def test_garbage_metrics_on_resume_are_skipped_with_a_warning(run_dir, demo_dir, capsys):
    with (run_dir / "metrics.jsonl").open("ab") as f:
        f.write(GARBAGE.replace(b'"step": 1', b'"step": 2'))
    code, _, err = run(run_dir, demo_dir, capsys, "--max_steps=6", "--resume=auto")
    assert code == 0, err[-3000:]
    assert "unreadable line" in err and "Traceback" not in err
    assert loss_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_kill_before_the_first_checkpoint_leaves_each_step_once(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "m"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=4",
           "--ckpt_every=100"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**fresh_env, "FASTMAE_FAULT": "after_step@3"},
                            cwd=ROOT, timeout=240)
    assert killed.returncode == -signal.SIGKILL and loss_steps(out) == [1, 2]
    r = subprocess.run([*cmd, "--resume=auto"], capture_output=True, text=True, env=fresh_env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert loss_steps(out) == [1, 2, 3, 4]  # was [1, 2, 1, 2, 3, 4]


def test_kill_between_last_checkpoint_and_summary_rerun_writes_it(run_dir, demo_dir, capsys):
    (run_dir / "summary.json").unlink()  # what a SIGKILL after the last save and before the summary leaves
    code, out, err = run(run_dir, demo_dir, capsys, "--max_steps=4", "--resume=auto")
    assert code == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 4 and isinstance(summary["train_loss"], float)
    assert "val_loss" in summary
    code, out, err = run(run_dir, demo_dir, capsys, "--max_steps=4", "--resume=auto")
    assert code == 0 and "nothing to do" in out + err
