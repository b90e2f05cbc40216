"""Random crash / preemption trials: kill a tiny training run at a random moment, resume it, and compare
the final weights with an uninterrupted run, bit for bit.

Each trial starts ``train.py`` (``--target=pretrain``) or ``fastmae finetune`` on the embedded digits
(``--target=finetune``: the evaluation loop, epoch-end validation and checkpoints included) in its own
process group, waits for a random step to be logged (or, for
step 0, a random moment of start-up), waits a random fraction of up to two steps more, sends SIGKILL or
SIGTERM (alternating) to the whole group, DataLoader workers included, as a scheduler does, then runs
``--resume=auto`` until the run completes. It records:

- resumed: the resumed run reached the last step and exited 0;
- bit-identical: its final model and optimizer state equal the uninterrupted run's exactly;
- lost steps: steps the killed run had completed (logged) minus the step it resumed from
  (work done twice; a SIGTERM must lose none);
- a SIGTERM run must exit 0 (preempted or finished).

    python tools/fault_campaign.py --trials 10                 # the figures in bench/RESULTS.md ("Faults and hostile input")
    python tools/fault_campaign.py --trials 2 --steps 6        # the CI smoke run (tests/test_faults_campaign.py)
    python tools/fault_campaign.py --trials 10 --target=finetune   # the same campaign on fine-tuning
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def train_cmd(out: Path, data: str, steps: int, ckpt_every: int, workers: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--data={data}", f"--output_dir={out}", "--img_size=32",
            "--patch_size=4", "--batch_size=8", "--accum_iter=2", f"--num_workers={workers}", "--progress=false",
            "--precision=fp32", f"--max_steps={steps}", f"--ckpt_every={ckpt_every}", "--log_every=1", "--keep_ckpts=2"]


FINETUNE_STEPS_PER_EPOCH = 10  # the digits' 1348 training images in batches of 128, the last partial one dropped


def finetune_cmd(out: Path, steps: int, ckpt_every: int) -> list[str]:
    if steps % FINETUNE_STEPS_PER_EPOCH:
        raise SystemExit(f"--target=finetune runs whole epochs of {FINETUNE_STEPS_PER_EPOCH} steps: pick --steps "
                         f"as a multiple of it")
    return [sys.executable, "-m", "fastmae.cli", "finetune", "--ckpt=random", "--embed_dim=32", "--depth=2",
            "--num_heads=2", "--batch_size=128", f"--epochs={steps // FINETUNE_STEPS_PER_EPOCH}", "--precision=fp32",
            f"--output_dir={out}", f"--ckpt_every={ckpt_every}", "--log_every=1", "--keep_ckpts=2",
            "--progress=false", "--quiet=true"]


def run_to_end(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"run failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def final_state(out: Path, steps: int) -> dict:
    ckpt = torch.load(out / f"checkpoint-{steps:08d}.pt", weights_only=True)
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"]["state"]}


def identical(a: dict, b: dict) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def logged_steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line torn by SIGKILL
    return rows


def wait_for_step(p: subprocess.Popen, out: Path, k: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        if sum("loss" in r for r in logged_steps(out)) >= k:
            return
        time.sleep(0.02)


def trial(i: int, kind: str, at_step: int, delay: float, base: Path, cmd_for, env: dict, ref: dict, steps: int,
          timeout: float) -> dict:
    out = base / f"trial{i:03d}"
    p = subprocess.Popen(cmd_for(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)
    if at_step > 0:
        wait_for_step(p, out, at_step, timeout)
    time.sleep(delay)
    interrupted = p.poll() is None
    if interrupted:
        os.killpg(p.pid, signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return {"trial": i, "kind": kind, "interrupted": True, "exit": "hung", "resumed": False, "identical": False}
    done_before = max([r["step"] for r in logged_steps(out) if "loss" in r], default=0)
    row = {"trial": i, "kind": kind, "after_step": at_step, "delay_s": round(delay, 2), "interrupted": interrupted,
           "exit": p.returncode, "steps_done": done_before}
    # --resume=auto starts from the newest checkpoint (saves are atomic: none is damaged here).
    resume_step = max([int(c.name[11:19]) for c in out.glob("checkpoint-[0-9]*.pt")], default=0)
    resumed_ok = False
    for _ in range(3):  # a resume that is itself complete ends the loop; SIGTERM runs may exit 0 mid-way
        r = subprocess.run(cmd_for(out) + ["--resume=auto"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=timeout)
        if r.returncode != 0:
            row["resume_error"] = r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else str(r.returncode)
            break
        if (out / f"checkpoint-{steps:08d}.pt").exists():
            resumed_ok = True
            break
    row["resumed"] = resumed_ok
    row["resumed_from"] = resume_step
    row["lost_steps"] = max(0, done_before - resume_step)
    row["identical"] = resumed_ok and identical(ref, final_state(out, steps))
    if not row["identical"] and kind == "SIGTERM" and p.returncode != 0:
        row["stderr"] = err[-500:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--target", choices=("pretrain", "finetune"), default="pretrain")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps of every run (default 12; finetune 20)")
    ap.add_argument("--ckpt_every", type=int, default=4)
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="", help="image folder; default: the embedded demo set")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.target == "pretrain" else 2 * FINETUNE_STEPS_PER_EPOCH)

    base = Path(tempfile.mkdtemp(prefix="fastmae-faults-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": os.environ.get("FASTMAE_CACHE", str(base / "cache")),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    data = args.data
    if not data and args.target == "pretrain":
        sys.path.insert(0, str(ROOT))
        from fastmae.data import prepare_demo_dataset

        data = str(prepare_demo_dataset(Path(env["FASTMAE_CACHE"]) / "demo"))
    if args.target == "finetune":
        cmd_for = lambda out: finetune_cmd(out, args.steps, args.ckpt_every)  # noqa: E731
    else:
        cmd_for = lambda out: train_cmd(out, data, args.steps, args.ckpt_every, args.num_workers)  # noqa: E731
    try:
        t0 = time.perf_counter()
        run_to_end(cmd_for(base / "reference"), env, args.timeout)
        wall = time.perf_counter() - t0
        ref = final_state(base / "reference", args.steps)
        times = [r["time"] for r in logged_steps(base / "reference") if "loss" in r]
        wall_step = (times[-1] - times[0]) / max(1, len(times) - 1)
        rng = random.Random(args.seed)
        rows = []
        for i in range(args.trials):
            kind = ("SIGKILL", "SIGTERM")[i % 2]  # alternating: both kinds in any run of 2 or more
            # A random step of the run, then a random instant within the next step or two (mid-step, mid-save,
            # at an epoch or window boundary); step 0 lands in start-up (imports, data scan, model build).
            at_step = rng.randrange(args.steps)
            delay = rng.uniform(0.2, 4.0) if at_step == 0 else rng.uniform(0.0, 2.0 * wall_step)
            rows.append(trial(i, kind, at_step, delay, base, cmd_for, env, ref, args.steps, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(summary(rows, args, wall))
    bad = [r for r in rows if not r["identical"] or (r["kind"] == "SIGTERM" and r["exit"] != 0)]
    return 1 if bad else 0


def summary(rows: list[dict], args, wall: float) -> str:
    lines = [f"fault campaign ({args.target}): {args.trials} trials, {args.steps} steps, ckpt_every {args.ckpt_every}, "
             f"{args.num_workers} loader workers, reference run {wall:.1f} s, seed {args.seed}; "
             "lost steps = steps logged before the kill minus the step resumed from",
             "", "| kill | trials | interrupted | exit 0 | resumed | bit-identical | lost steps (sum / max) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in ("SIGKILL", "SIGTERM", "all"):
        rs = [r for r in rows if kind in ("all", r["kind"])]
        if not rs:
            continue
        lost = [r.get("lost_steps", 0) for r in rs]
        lines.append(f"| {kind} | {len(rs)} | {sum(r['interrupted'] for r in rs)} | {sum(r['exit'] == 0 for r in rs)} | "
                     f"{sum(r['resumed'] for r in rs)} | {sum(r['identical'] for r in rs)} | {sum(lost)} / {max(lost)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
