"""Shared bits of the model/step benchmarks: interleaved timing, environment stamp, CSV rows."""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_CSV = Path(__file__).with_name("results.csv")


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times in round-robin order (after ``warmup`` rounds).

    Round-robin spreads the machine's noise (other processes, frequency changes)
    evenly over the contenders, so their ratio is more stable than their times.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def append_csv(rows: list[dict]) -> None:
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        if new:
            w.writeheader()
        w.writerows(rows)


def stamp(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "git": git_sha(), "date": time.strftime("%Y-%m-%d")}
