"""The training stack end to end: outputs, exact resume after SIGKILL, preemption, bad steps, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
TINY = ["--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32"]


def train(out: Path, data: Path, *extra: str, env: dict, check: bool = True, timeout: int = 300):
    cmd = [sys.executable, "train.py", f"--data={data}", f"--output_dir={out}", *TINY, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def final_params(out: Path, step: int) -> dict:
    return torch.load(out / f"checkpoint-{step:08d}.pt", weights_only=True)["model"]


def test_main_job_leaves_its_outputs(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "run"
    r = train(out, demo_dir, "--epochs=2", "--log_every=2", env=fresh_env)
    for name in ("config.json", "metrics.jsonl", "summary.json", "reconstructions.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["img_size"] == 32 and cfg["preset"] == "tiny"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "img_s", "grad_norm"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] > 0 and summary["val_loss"] > 0
    assert "fastmae pretrain summary" in r.stdout + r.stderr
    ckpt = torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=True)
    assert {"model", "optimizer", "step", "epoch", "data", "rng", "config", "versions"} <= set(ckpt)


@pytest.mark.parametrize("fault", ["after_step@2", "during_save@4", "after_step@5"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, demo_dir, fresh_env, fault, reference_run):
    steps = reference_run["steps"]
    out = tmp_path / "killed"
    r = train(out, demo_dir, *reference_run["args"], env={**fresh_env, "FASTMAE_FAULT": fault}, check=False)
    assert r.returncode == -signal.SIGKILL
    train(out, demo_dir, *reference_run["args"], "--resume=auto", env=fresh_env)
    ref, got = reference_run["params"], final_params(out, steps)
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after resume ({fault})"
    assert not list(out.glob(".tmp-*")), "a partial checkpoint write was left behind"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_dir):
    import os

    out = tmp_path_factory.mktemp("reference")
    # The demo's 320 training images give 10 batches of 32 = 5 optimizer steps of 2 micro-batches per epoch:
    # the kill points land mid-epoch, on a save, and after the epoch boundary.
    args = ["--batch_size=32", "--max_steps=7", "--accum_iter=2", "--ckpt_every=2", "--log_every=3", "--epochs=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(out / "cache")}
    train(out, demo_dir, *args, env=env)
    return {"args": args, "steps": 7, "params": final_params(out, 7)}


def test_sigterm_saves_and_exits_zero(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "pre"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=100000",
           "--log_every=1", "--ckpt_every=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fresh_env, cwd=ROOT)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    ckpts = sorted(out.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1
    step = torch.load(ckpts[0], weights_only=True)["step"]
    assert step >= 2 and f"SIGTERM: saved {ckpts[0]} at step {step}" in stdout


def test_nonfinite_loss_skips_the_update(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "nan"
    train(out, demo_dir, "--max_steps=4", "--log_every=1", env={**fresh_env, "FASTMAE_FAULT": "nan_loss@1"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    params = final_params(out, 4)
    assert all(torch.isfinite(v).all() for v in params.values())
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def test_k_nonfinite_steps_in_a_row_abort_clearly(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "abort"
    r = train(out, demo_dir, "--max_steps=20", "--log_every=1", "--ckpt_every=1", "--max_bad_steps=3",
              env={**fresh_env, "FASTMAE_FAULT": "nan_loss@2+"}, check=False)
    assert r.returncode == 1
    assert "3 consecutive steps had a non-finite loss" in r.stderr
    assert "Traceback" not in r.stderr
    for ckpt in out.glob("checkpoint-*.pt"):
        assert all(torch.isfinite(v).all() for v in torch.load(ckpt, weights_only=True)["model"].values())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochz=3"], "unknown config key --epochz"),
        (["--epochs=three"], "--epochs expects int, got 'three'"),
        (["--precision=fp8"], "precision must be one of"),
        (["--mask_ratio=1.0"], r"mask_ratio must be in [0, 1)"),
        (["--preset=gigantic"], "unknown preset 'gigantic'"),
        (["--img_size=30", "--patch_size=4"], "img_size 30 is not divisible by the patch size 4"),
        (["--data=/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_bad_config_is_one_line_before_any_work(tmp_path, fresh_env, args, message):
    out = tmp_path / "bad"
    r = subprocess.run([sys.executable, "train.py", f"--output_dir={out}", *args], capture_output=True, text=True,
                       env=fresh_env, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastmae: error:"), r.stderr[-2000:]
    assert message in lines[0]
    assert not list(out.glob("checkpoint-*"))


def test_compiled_step_runs_fullgraph_on_cpu(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "compiled"
    train(out, demo_dir, "--max_steps=3", "--log_every=1", "--compile=true", env=fresh_env, timeout=600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)


def test_resume_into_another_architecture_names_the_mismatch(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "arch"
    train(out, demo_dir, "--max_steps=1", env=fresh_env)
    r = train(out, demo_dir, "--max_steps=2", "--resume=auto", "--patch_size=8", "--allow_config_change",
              env=fresh_env, check=False)
    assert r.returncode == 2
    assert "shape mismatch for patch_embed.proj.weight" in r.stderr and "Traceback" not in r.stderr
