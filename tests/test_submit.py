"""`fastmae submit`: the batch script it writes, run here with stand-ins for srun/scontrol; requeue on USR1 saves first."""

from __future__ import annotations

import json
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
    assert "--nproc_per_node=8" in script and "--preset=large" in script and script.rstrip().endswith("finish $?")
    assert not Path("runs/mae-large/submit.sbatch").exists()  # a dry run writes nothing
    assert main(["submit", "--time=soon", "--dry_run"]) == 2
    assert "--time must be" in capsys.readouterr().err


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
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigterm)
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

    step = torch.load(ckpts[-1], weights_only=True)["step"]
    assert 2 <= step < 100000
    assert (run_dir / "preempted" / "rank-0").read_text().strip() == str(step)  # the clean save the script read


@pytest.mark.skipif(sys.platform != "linux", reason="Slurm is Linux")
def test_without_sbatch_it_says_where_to_run(tmp_path, monkeypatch, capsys):
    from fastmae.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--preset=base"]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def _stub_bin(tmp_path: Path, srun_body: str) -> Path:
    """srun / scontrol stand-ins on PATH that record their argv (NUL-separated) and run nothing they are given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {tmp_path}/srun.argv\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [[ "$1" == show ]]; then echo localhost; else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _run_script(tmp_path: Path, script: str, bin_dir: Path, **kw) -> subprocess.Popen:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost"}
    return subprocess.Popen(["bash", str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigterm, **kw)


def _default_sigterm() -> None:
    """A finished in-process training run ignores SIGTERM (cli_main), and children inherit ignored signals:
    bash cannot trap a signal ignored on entry. Slurm starts the batch script with the default action."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


HOSTILE = ["x\ntouch {pwned}", "$(touch {pwned})", "`touch {pwned}`", "x; touch {pwned}", "x\rtouch {pwned}",
           "x\x1b]0;touch {pwned}\x07", "x' ; touch {pwned} ; '", 'x" ; touch {pwned} ; "']
JOB_KEYS = ["job_name", "partition", "account", "qos", "mem", "time", "setup"]
TRAIN_KEYS = ["output_dir", "data", "wandb"]


@pytest.mark.parametrize("key", JOB_KEYS + TRAIN_KEYS + ["config:output_dir", "config:data"])
def test_hostile_values_never_run(key, tmp_path, monkeypatch, capsys):
    """Each hostile value in each field (flags and a --config file): refused with one line naming the key, or
    written so that bash parses the script and a run under stand-in srun/scontrol creates nothing."""
    from fastmae.cli import main

    monkeypatch.chdir(tmp_path)
    bin_dir = _stub_bin(tmp_path, "exit 0")
    for i, template in enumerate(HOSTILE):
        pwned = tmp_path / f"PWNED{i}"
        value = template.format(pwned=pwned)
        if key.startswith("config:"):
            field_name = key.split(":")[1]
            cfg_file = tmp_path / "cfg.json"
            cfg_file.write_text(json.dumps({field_name: value}))
            argv = [f"--config={cfg_file}"]
        else:
            field_name, argv = key, [f"--{key}={value}"]
        if field_name == "setup" and "\n" not in value and "\r" not in value and "\x1b" not in value:
            continue  # a one-line setup is shell by design (documented): it runs as written
        code = main(["submit", "--dry_run", "--no_compile", *argv])
        out, err = capsys.readouterr()
        if code == 2:
            assert err.startswith("fastmae: error: ") and err.count("\n") == 1 and f"--{field_name}" in err, err
            continue
        assert code == 0, err
        assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0, out
        proc = _run_script(tmp_path, out, bin_dir)
        log, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, log
        assert not pwned.exists(), (key, value, out)
        argv_seen = (tmp_path / "srun.argv").read_text().split("\0")
        if field_name in ("data", "wandb"):
            assert f"--{field_name}={value}" in argv_seen, argv_seen  # delivered verbatim, as one argument
        assert not list(tmp_path.glob("PWNED*")), (key, value)


def test_preempted_job_ends_0_only_when_every_rank_saved(tmp_path):
    """torchrun exits 1 after forwarding a SIGTERM (SignalException) even when both ranks saved: the script
    reads the ranks' save files; without them (a rank failed to save) the job reports the failure."""
    for ranks_saving, expected in ((2, 0), (1, 1)):
        run_dir = tmp_path / f"run{ranks_saving}"
        saves = "; ".join(f"echo 3 > {run_dir}/preempted/rank-{r}" for r in range(ranks_saving))
        # The launcher stand-in behaves like torchrun on SIGTERM: the workers save, then it exits 1.
        body = (f'trap "mkdir -p {run_dir}/preempted; {saves}; exit 1" TERM\ntouch {tmp_path}/ready\n'
                "while true; do sleep 0.05; done")
        bin_dir = _stub_bin(tmp_path, body)
        cfg, flags = training_args([f"--output_dir={run_dir}"])
        (run_dir / "preempted").mkdir(parents=True)
        (run_dir / "preempted" / "rank-1").write_text("1\n")  # a previous job's file must not count
        proc = _run_script(tmp_path, batch_script(SubmitConfig(gpus_per_node=2), cfg, flags, sys.executable,
                                                  str(tmp_path)), bin_dir, start_new_session=True)
        deadline = time.time() + 30
        while not (tmp_path / "ready").exists():  # the stand-in has its TERM trap in place
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert not (run_dir / "preempted").exists()  # the script cleared the previous job's files
        proc.send_signal(signal.SIGUSR1)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            try:  # the launcher stand-in, if the script left it running: its own session, ended by id
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert proc.returncode == expected, out
        assert (tmp_path / "scontrol.log").read_text().split()[-2:] == ["requeue", "7"]
        (tmp_path / "srun.argv").unlink()
        (tmp_path / "ready").unlink()
