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

RESULTS_DIR = Path(__file__).with_name("results")  # one CSV per benchmark, kept out of git


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


def append_csv(rows: list[dict]) -> Path:
    """Append rows to bench/results/<bench>.csv; a changed set of columns rewrites the file with their union."""
    path = RESULTS_DIR / f"{rows[0]['bench']}.csv"
    path.parent.mkdir(exist_ok=True)
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys([k for r in old + rows for k in r]))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old + rows)
    return path


def make_train_step(model, device: torch.device, amp_dtype: torch.dtype, forward: Callable, batch: torch.Tensor,
                    mask_ratio: float) -> Callable[[], None]:
    """The training step ``fastmae pretrain`` runs (``fastmae.engine.step.train_step``: autocast forward, backward,
    gradient norm, fused AdamW with found_inf) on a fixed batch; ``forward(batch, mask_ratio=...)[0]`` is the loss."""
    from fastmae.engine.optim import build_adamw
    from fastmae.engine.step import train_step

    opt = build_adamw(model, torch.tensor(1e-4, device=device), 0.05, (0.9, 0.95), device)
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: train_step(forward, opt, params, lambda: batch, mask_ratio=mask_ratio, amp_dtype=amp_dtype)


def stamp(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "git": git_sha(), "date": time.strftime("%Y-%m-%d")}
