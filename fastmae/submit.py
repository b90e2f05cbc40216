"""``fastmae submit``: a Slurm batch job around ``torchrun`` that survives time limits and preemption.

Every key of ``fastmae pretrain`` passes through to the training command, which always runs with
``--resume=auto``: a requeued job continues from the run folder's latest checkpoint. The job:
- one ``torchrun`` per node (``srun``), ``--nproc_per_node`` = GPUs per node, c10d rendezvous on the first node;
- ``--signal=B:USR1@<grace>``: before the time limit the batch shell gets USR1, sends SIGTERM down to
  the workers (torchrun forwards it; training saves a checkpoint and exits 0), then ``scontrol requeue``;
- ``--requeue``: a preempted job goes back to the queue; SIGTERM from preemption reaches the workers the
  same way and they save before exiting.
The script is written to ``<output_dir>/submit.sbatch`` and passed to ``sbatch``; ``--dry_run`` prints it
and submits nothing.

Examples:
    fastmae submit --nodes=4 --gpus_per_node=8 --partition=gpu --preset=base --data=/data/imagenet --dry_run
    fastmae submit --time=24:00:00 --preset=large --data="/shards/train-{000000..001023}.tar"
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastmae.config import PretrainConfig, help_text, parse_overrides, split_args

_H = "help"


@dataclass
class SubmitConfig:
    nodes: int = field(default=1, metadata={_H: "Slurm nodes (one torchrun each)"})
    gpus_per_node: int = field(default=8, metadata={_H: "GPUs per node = torchrun processes per node"})
    cpus_per_task: int = field(default=0, metadata={_H: "CPU cores per node for loading; 0 = 10 per GPU"})
    mem: str = field(default="", metadata={_H: "memory per node (Slurm --mem, e.g. 480G); '' = the partition's"})
    time: str = field(default="72:00:00", metadata={_H: "time limit per job (requeued jobs get it again)"})
    partition: str = field(default="", metadata={_H: "Slurm partition; '' = the cluster's default"})
    account: str = field(default="", metadata={_H: "Slurm account; '' = yours by default"})
    qos: str = field(default="", metadata={_H: "Slurm QOS; '' = none"})
    job_name: str = field(default="", metadata={_H: "Slurm job name; '' = fastmae-<run folder name>"})
    grace_s: int = field(default=180, metadata={_H: "seconds before the time limit to checkpoint and requeue"})
    port: int = field(default=29500, metadata={_H: "rendezvous port on the first node"})
    setup: str = field(default="", metadata={_H: "shell line run before training (e.g. 'module load cuda')"})
    dry_run: bool = field(default=False, metadata={_H: "print the batch script, submit nothing"})

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nodes and gpus_per_node must be positive")
        if self.cpus_per_task < 0 or self.grace_s < 0:
            raise ValueError("cpus_per_task and grace_s must be >= 0")
        parts = self.time.replace("-", ":").split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 4:
            raise ValueError(f"time must be Slurm's [D-]HH:MM:SS, got {self.time!r}")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Flags for the job (:class:`SubmitConfig` keys) and flags for training (everything else, in order)."""
    ours = {f.name for f in fields(SubmitConfig)}
    job, train = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else ""
        takes_next = "=" not in arg and key in ours and key != "dry_run" and i + 1 < len(argv)
        chunk = argv[i : i + 2] if takes_next else [arg]
        (job if key in ours else train).extend(chunk)
        i += len(chunk)
    return job, train


def training_args(train_argv: list[str]) -> tuple[PretrainConfig, list[str]]:
    """The validated training config and its flags in canonical ``--key=value`` form, ending in ``--resume=auto``."""
    cfg = parse_overrides(train_argv)
    flags = [f"--{k}={v}" for k, v in split_args(train_argv, PretrainConfig) if k not in ("resume", "output_dir")]
    return cfg, [*flags, f"--output_dir={os.path.abspath(cfg.output_dir)}", "--resume=auto"]


def batch_script(job: SubmitConfig, cfg: PretrainConfig, train_flags: list[str], python: str, workdir: str) -> str:
    run_dir = os.path.abspath(cfg.output_dir)
    name = job.job_name or f"fastmae-{Path(run_dir).name}"
    cpus = job.cpus_per_task or 10 * job.gpus_per_node
    sb = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={job.gpus_per_node}",
          f"--cpus-per-task={cpus}", f"--time={job.time}", f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
          "--requeue", f"--signal=B:USR1@{job.grace_s}"]
    sb += [f"--{k}={getattr(job, k)}" for k in ("partition", "account", "qos", "mem") if getattr(job, k)]
    launch = [python, "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES", f"--nproc_per_node={job.gpus_per_node}",
              "--rdzv_id=$SLURM_JOB_ID", "--rdzv_backend=c10d", f"--rdzv_endpoint=$head_node:{job.port}",
              "-m", "fastmae.cli", "pretrain", *(shlex.quote(f) for f in train_flags)]
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb),
             "# Written by `fastmae submit`. Submit again with: sbatch " + shlex.quote(f"{run_dir}/submit.sbatch"),
             "# Training resumes from the run folder's latest checkpoint (--resume=auto) after a requeue.",
             "set -u",
             f"cd {shlex.quote(workdir)}",
             f"export OMP_NUM_THREADS={max(1, cpus // job.gpus_per_node)} OMP_WAIT_POLICY=PASSIVE",
             *([job.setup] if job.setup else []),
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             "stop_training() {  # SIGTERM reaches every worker through srun and torchrun: each saves and exits 0",
             '  kill -TERM "$child" 2>/dev/null',
             '  wait "$child"',
             "}",
             'on_time_limit() { echo "fastmae submit: time limit near: checkpoint, then requeue job $SLURM_JOB_ID"; '
             'stop_training; scontrol requeue "$SLURM_JOB_ID"; exit 0; }',
             'on_term() { echo "fastmae submit: SIGTERM (preemption or scancel): checkpoint and stop"; stop_training; exit 0; }',
             "trap on_time_limit USR1",
             "trap on_term TERM",
             "srun --kill-on-bad-exit=1 " + " ".join(launch) + " &",
             "child=$!",
             'wait "$child"',
             'exit $?']
    return "\n".join(lines) + "\n"


def submit(argv: list[str]) -> int:
    job_argv, train_argv = split_argv(argv)
    job = parse_overrides(job_argv, cls=SubmitConfig, presets={})
    cfg, flags = training_args(train_argv)
    script = batch_script(job, cfg, flags, sys.executable, os.getcwd())
    if job.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("sbatch not found: run fastmae submit on the cluster's login node (or --dry_run to see the script)")
    path = Path(cfg.output_dir) / "submit.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    r = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if r.returncode:
        raise ValueError(f"sbatch {path} failed: {(r.stderr or r.stdout).strip()}")
    print(f"{r.stdout.strip()} ({path}; logs in {os.path.abspath(cfg.output_dir)}/slurm-<job>.out)")
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text([], SubmitConfig, {}, "usage: fastmae submit [job keys] [fastmae pretrain keys]", __doc__))
        print("\nevery other key is a `fastmae pretrain` key (fastmae pretrain --help)")
        return 0
    try:
        return submit(argv)
    except ValueError as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
