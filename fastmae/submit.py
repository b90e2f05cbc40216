"""``fastmae submit``: a Slurm batch job around ``torchrun`` that survives time limits and preemption.

Every key of ``fastmae pretrain`` passes through to the training command, which always runs with
``--resume=auto``: a requeued job continues from the run folder's latest checkpoint. The job:
- one ``torchrun`` per node (``srun``), ``--nproc_per_node`` = GPUs per node, c10d rendezvous on the first node;
- ``--signal=B:USR1@<grace>``: before the time limit the batch shell gets USR1, sends SIGTERM down to
  the workers (torchrun forwards it; training saves a checkpoint), then ``scontrol requeue``;
- ``--requeue``: a preempted job goes back to the queue; SIGTERM from preemption reaches the workers the
  same way and they save before exiting.
Values are never interpolated raw: ``#SBATCH`` values must be Slurm names/sizes (no whitespace, quotes or control
characters), training flags are ``shlex``-quoted and one line each (also when they come from ``--config``), and
``--setup`` is a shell line run as written (your own command line; one line).
torchrun exits 1 after forwarding a SIGTERM however cleanly the ranks saved: each rank writes
``<run>/preempted/rank-<r>`` after its part of the save, and the script ends 0 when all of them did.
The script is written to ``<output_dir>/submit.sbatch`` and passed to ``sbatch``; ``--dry_run`` prints it
and submits nothing.

Examples:
    fastmae submit --nodes=4 --gpus_per_node=8 --partition=gpu --preset=base --data=/data/imagenet --dry_run
    fastmae submit --time=24:00:00 --preset=large --data="/shards/train-{000000..001023}.tar"
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastmae.config import PretrainConfig, help_text, parse_overrides, split_args
from fastmae.engine.preemption import SAVED_DIR

_H = "help"
# Slurm names (partition, account, QOS lists) and sizes: anything else in a `#SBATCH` line is refused, not quoted,
# because sbatch parses those lines with its own rules and bash reads the same file.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,+-]+")
_SLURM_MEM = re.compile(r"[0-9]+[KMGT]?B?")
# Job names and paths in `#SBATCH` lines: printable, no whitespace or quotes (sbatch would split or strip them).
_SBATCH_TEXT = re.compile(r"[^\s'\"\\]+")


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
        for key in ("partition", "account", "qos"):
            _check(key, getattr(self, key), _SLURM_NAME, "a Slurm name (letters, digits, _ . , + -)")
        _check("mem", self.mem, _SLURM_MEM, "a Slurm size such as 480G")
        _check("job_name", self.job_name, _SBATCH_TEXT, "printable, without spaces or quotes")
        # The setup line is shell by design (the user's own command line, never read from a --config file): it
        # runs as written, but it stays one line so nothing after it in the script can be displaced.
        one_line("setup", self.setup)
        parts = self.time.replace("-", ":").split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 4:
            raise ValueError(f"--time must be Slurm's [D-]HH:MM:SS, got {self.time!r}")


def one_line(key: str, value: str) -> None:
    """Refuse a newline or any other control character in a value that reaches the batch script."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"--{key} must be one line without control characters (found {bad!r}): {value!r}")


def _check(key: str, value: str, pattern: re.Pattern, what: str) -> None:
    one_line(key, value)
    if value and not pattern.fullmatch(value):
        raise ValueError(f"--{key} must be {what}, got {value!r}")


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
    pairs = [(k, v) for k, v in split_args(train_argv, PretrainConfig) if k not in ("resume", "output_dir")]
    for key, value in [*pairs, ("output_dir", os.path.abspath(cfg.output_dir))]:
        one_line(key, value)  # quoted in the script too; a value spanning lines is never what was meant
    _check("output_dir", os.path.abspath(cfg.output_dir), _SBATCH_TEXT, "a path without spaces or quotes (it is "
           "written into #SBATCH --output)")
    flags = [f"--{k}={v}" for k, v in pairs]
    return cfg, [*flags, f"--output_dir={os.path.abspath(cfg.output_dir)}", "--resume=auto"]


def batch_script(job: SubmitConfig, cfg: PretrainConfig, train_flags: list[str], python: str, workdir: str) -> str:
    run_dir = os.path.abspath(cfg.output_dir)
    job.validate()  # also when called without parse_overrides: the #SBATCH values below are written verbatim
    one_line("workdir", workdir)
    name = job.job_name or f"fastmae-{Path(run_dir).name}"
    cpus = job.cpus_per_task or 10 * job.gpus_per_node
    sb = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={job.gpus_per_node}",
          f"--cpus-per-task={cpus}", f"--time={job.time}", f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
          "--requeue", f"--signal=B:USR1@{job.grace_s}"]
    sb += [f"--{k}={getattr(job, k)}" for k in ("partition", "account", "qos", "mem") if getattr(job, k)]
    launch = [shlex.quote(python), "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES",
              f"--nproc_per_node={job.gpus_per_node}",
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
             # Every rank writes a file here after its part of a preemption save; torchrun itself exits 1 after
             # forwarding a SIGTERM however cleanly they saved, so these files decide the job's exit code.
             f"saved_dir={shlex.quote(f'{run_dir}/{SAVED_DIR}')}",
             'rm -rf -- "$saved_dir"',
             f"ranks=$(( SLURM_NNODES * {job.gpus_per_node} ))",
             'finish() {  # exit 0 after a clean save on every rank, else torchrun\'s code',
             '  local rc=$1 saved',
             '  saved=$(find "$saved_dir" -maxdepth 1 -name "rank-*" 2>/dev/null | wc -l)',
             '  if [ "$saved" -ge "$ranks" ]; then echo "fastmae submit: all $ranks ranks saved (launcher exit $rc)"; exit 0; fi',
             '  [ "$rc" -ne 0 ] && echo "fastmae submit: $saved of $ranks ranks reported a clean save; exit $rc"',
             '  exit "$rc"',
             "}",
             "stop_training() {  # SIGTERM reaches every worker through srun and torchrun: each saves and exits",
             '  kill -TERM "$child" 2>/dev/null',
             '  wait "$child"',
             "}",
             'on_time_limit() { echo "fastmae submit: time limit near: checkpoint, then requeue job $SLURM_JOB_ID"; '
             'stop_training; local rc=$?; scontrol requeue "$SLURM_JOB_ID"; finish "$rc"; }',
             'on_term() { echo "fastmae submit: SIGTERM (preemption or scancel): checkpoint and stop"; stop_training; '
             'finish $?; }',
             "trap on_time_limit USR1",
             "trap on_term TERM",
             "srun --kill-on-bad-exit=1 " + " ".join(launch) + " &",
             "child=$!",
             'wait "$child"',
             'finish $?']
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
