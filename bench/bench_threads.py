"""CPU threads on a quiet and on a loaded machine: the tiny pretraining step with 1 / 2 / auto threads.

    python bench/bench_threads.py                 # the machine as it is, then with `yes > /dev/null` on core 1
    python bench/bench_threads.py --steps=6 --rounds=3

Each contender is a fresh process (OpenMP reads its wait policy once, when torch loads it) running the
main job's step (``fastmae.engine.step.train_step``: mae_vit_tiny at 64 px, patch 8, batch 32, autocast as
train.py picks it, fused AdamW)
on random images: warm-up, then ``--steps`` timed steps; rounds are interleaved and medians taken.
Ratios are against 1 thread in the same condition. Markdown table to stdout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, os, sys, time
threads = int(sys.argv[1]); steps = int(sys.argv[2])
from fastmae.threads import resolve_threads
import torch
torch.set_num_threads(resolve_threads(threads))
torch.set_flush_denormal(True)
from fastmae import mae_vit_tiny
from fastmae.engine.optim import build_adamw
from fastmae.engine.step import resolve_precision, train_step
from fastmae.config import PretrainConfig
dev = torch.device("cpu")
amp = resolve_precision(PretrainConfig().step.precision, dev)
torch.manual_seed(0)
m = mae_vit_tiny(img_size=64, patch_size=8)
lr = torch.tensor(1e-4)
opt = build_adamw(m, lr, 0.05, (0.9, 0.95), dev)
params = [p for p in m.parameters() if p.requires_grad]
x = torch.randn(32, 3, 64, 64)
def step():
    train_step(m, opt, params, lambda: x, mask_ratio=0.75, amp_dtype=amp)
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
dt = time.perf_counter() - t
print(json.dumps({"img_s": 32 * steps / dt, "threads": torch.get_num_threads()}))
"""

# name -> (--threads value, extra environment); "default" is torch's own choice before this change.
CONTENDERS = {
    "1 thread": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, OpenMP default wait": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "fastmae default (--threads=0, PASSIVE)": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def run(threads: int, extra: dict, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env.update(extra, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps)], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(steps: int, rounds: int) -> dict[str, tuple[float, int]]:
    rates: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    used: dict[str, int] = {}
    for _ in range(rounds):
        for name, (threads, extra) in CONTENDERS.items():
            out = run(threads, extra, steps)
            rates[name].append(out["img_s"])
            used[name] = out["threads"]
    return {k: (statistics.median(v), used[k]) for k, v in rates.items()}


def main(argv: list[str]) -> None:
    opts = {"steps": 8, "rounds": 2}
    for a in argv:
        key, _, val = a.lstrip("-").replace("-", "_").partition("=")
        if key not in opts:
            raise SystemExit(f"unknown flag --{key}; flags: --steps=N --rounds=N")
        opts[key] = int(val)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores")
    results = {"as is": measure(opts["steps"], opts["rounds"])}
    hog = subprocess.Popen(["taskset", "-c", "1", "yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        results["yes on core 1"] = measure(opts["steps"], opts["rounds"])
    finally:
        hog.terminate()
        hog.wait()
    print("\n| contender | condition | threads used | img/s | vs 1 thread |\n|---|---|---:|---:|---:|")
    for cond, res in results.items():
        one = res["1 thread"][0]
        for name, (rate, used) in res.items():
            print(f"| {name} | {cond} | {used} | {rate:.1f} | {rate / one:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
