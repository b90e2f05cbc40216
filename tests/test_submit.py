"""`fastmae submit`: the batch script it writes, run here with stand-ins for srun/scontrol; requeue on USR1 saves first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmae.submit import SubmitConfig, batch_script, split_argv, training_args

ROOT = Path(__file__).parent.parent


def test_flags_split_between_job_and_training():
    job, train = split_argv(["--nodes", "2", "--preset=base", "--dry_run", "--data=/d", "--partition=gpu", "--no_compile"])
    assert job == ["--nodes", "2", "--dry_run", "--partition=gpu"]
    assert train == ["--preset=base", "--data=/d", "--no_compile"]
    cfg, flags = training_args(train)
    assert flags[:3] == ["--preset=base", "--data=/d", "--compile=false"]
    assert flags[-2:] == [f"--output_dir={os.path.abspath('runs/mae-base')}", "--resume=auto"]
    assert cfg.output_dir == "runs/mae-base"


def test_dry_run_prints_the_script(capsys):
    from fastmae.cli import main

    assert main(["submit", "--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--time=1-00:00:00", "--preset=large",
                 "--data=/data/imagenet", "--dry_run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@180",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00", "trap on_time_limit USR1"):
        assert line in script.splitlines(), line
    assert "--nproc_per_node=8" in script and "--preset=large" in script and script.rstrip().endswith("exit $?")
    assert not Path("runs/mae-large/submit.sbatch").exists()  # a dry run writes nothing
    assert main(["submit", "--time=soon", "--dry_run"]) == 2
    assert "time must be" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_script_checkpoints_and_requeues_on_time_limit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun stand-in: drop srun's own flags, run the step; scontrol stand-in: one host, requeue recorded.
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [[ "$1" == show ]]; then echo localhost; else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    job = SubmitConfig(gpus_per_node=1, cpus_per_task=1, port=_free_port())
    cfg, flags = training_args([f"--output_dir={run_dir}", "--img_size=32", "--patch_size=4", "--batch_size=8",
                                "--num_workers=0", "--max_steps=100000", "--epochs=1000", "--log_every=1",
                                "--ckpt_every=100000", "--no_progress", "--no_tensorboard", "--precision=fp32",
                                "--device=cpu"])
    script = tmp_path / "job.sbatch"
    script.write_text(batch_script(job, cfg, flags, sys.executable, str(ROOT)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "FASTMAE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # what Slurm sends grace_s before the time limit
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "time limit near" in out and "SIGTERM: saved" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    ckpts = sorted(run_dir.glob("checkpoint-*.pt"))
    assert ckpts, out[-3000:]
    import torch

    assert 2 <= torch.load(ckpts[-1], weights_only=True)["step"] < 100000


@pytest.mark.skipif(sys.platform != "linux", reason="Slurm is Linux")
def test_without_sbatch_it_says_where_to_run(tmp_path, monkeypatch, capsys):
    from fastmae.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--preset=base"]) == 2
    assert "sbatch not found" in capsys.readouterr().err
