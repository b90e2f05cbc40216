"""Issue 24, section 3: files read back never surprise (metrics.jsonl, summary after a kill, checkpoint fields)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import TINY, one_error_line

from fastmae.pretrain import cli_main

ROOT = Path(__file__).parent.parent
GARBAGE = b'{"step": 1, "loss": 0.5}\n\x00\xff\xfe not json\n{"step": "two", "loss": "x"}\n[1, 2]\n{"step": 3, "loss'


def run(out: Path, data: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli_main([f"--data={data}", f"--output_dir={out}", *TINY, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def loss_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


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


HOSTILE_FIELDS = {
    "rng_wrong_type": (lambda c: c.update(rng={"python": "x", "numpy": 1, "torch": "abc"}), "'rng'"),
    "rng_per_rank_strings": (lambda c: c.update(rng=[{**c["rng"], "torch": ["a"] * 5056}]), "'rng'"),
    "null_schedule": (lambda c: c["config"].update(epochs=None, warmup_epochs=None), "config epochs"),
    "img_size_1e7": (lambda c: c["config"].update(img_size=10**7), "config img_size"),
    "stray_block_1e9": (lambda c: c["model"].update({"blocks.1000000000.norm1.weight": torch.ones(1)}), "blocks.N"),
    "image_mean_strings": (lambda c: c.update(pixel_mean=["a", "b", "c"]), "pixel_mean"),
    "arch_img_size_1e7": (lambda c: c.update(arch={"img_size": 10**7, "num_heads": 3}), "img_size"),
    "step_string": (lambda c: c.update(step="4"), "step"),
}


@pytest.fixture(scope="module")
def hostile_ckpts(four_steps, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (mutate, _) in HOSTILE_FIELDS.items():
        ckpt = torch.load(four_steps / "checkpoint-00000004.pt", weights_only=True)
        mutate(ckpt)
        torch.save(ckpt, out / f"{name}.pt")
        paths[name] = out / f"{name}.pt"
    return paths


@pytest.mark.parametrize("name", list(HOSTILE_FIELDS))
def test_hostile_checkpoint_fields_are_one_line_in_every_reader(name, hostile_ckpts, run_dir, demo_dir, tmp_path, capsys):
    """Resume, export and visualize read checkpoints through one validator: each hostile field is one line."""
    from fastmae.cli import main

    path, needle = hostile_ckpts[name], HOSTILE_FIELDS[name][1]
    code, _, err = run(run_dir, demo_dir, capsys, "--max_steps=6", f"--resume={path}")
    assert code == 2 and one_error_line(err, needle)
    for argv in (["export", f"--ckpt={path}", f"--out={tmp_path}/hf"],
                 ["export", f"--ckpt={path}", f"--out={tmp_path}/timm", "--format=timm"],
                 ["visualize", f"--ckpt={path}", f"--output={tmp_path}/v.png"]):
        assert main(argv) == 2, argv
        one_error_line(capsys.readouterr().err, needle)


def test_resume_auto_falls_back_past_a_hostile_latest(hostile_ckpts, run_dir, demo_dir, capsys):
    shutil.copy(hostile_ckpts["rng_wrong_type"], run_dir / "checkpoint-00000004.pt")
    Path(str(run_dir / "checkpoint-00000004.pt") + ".json").unlink()
    code, _, err = run(run_dir, demo_dir, capsys, "--max_steps=6", "--resume=auto")
    assert code == 0, err[-3000:]
    assert "skipping checkpoint-00000004.pt" in err and "resuming from checkpoint-00000002.pt" in err


@pytest.mark.parametrize("content", ["namespace", "dict", "garbage"])
def test_visualize_mask_that_is_not_a_tensor_is_one_line(content, four_steps, tmp_path, capsys):
    import argparse

    from fastmae.cli import main

    mask = tmp_path / "mask.pt"
    if content == "garbage":
        mask.write_bytes(b"\x00not a torch file" * 10)
    else:
        torch.save(argparse.Namespace(x=1) if content == "namespace" else {"m": torch.ones(2, 4)}, mask)
    assert main(["visualize", f"--ckpt={four_steps}/checkpoint-00000004.pt", f"--mask={mask}",
                 f"--output={tmp_path}/v.png"]) == 2
    one_error_line(capsys.readouterr().err, "--mask")
