"""The one timing harness of bench/ (interleaved rounds after warm-up; CUDA events on a GPU, ``perf_counter``
elsewhere; median and p20-p80 spread), and the shared bits of the model/step benchmarks: the HF ViTMAE step,
the engine's training step, environment stamp, CSV rows. Every bench script and the GPU report time through
:func:`interleaved` / :func:`time_ms`; the pytest-benchmark modules leave the timing to pytest-benchmark and
share only :func:`sync`."""

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
        torch.cuda.synchronize(device)  # deliberate: a timer's edge


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """One call's time: CUDA events around it on a GPU (the device's time, launches included), wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # deliberate: this is a timer
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function, ``repeats`` samples each, timed in round-robin order after ``warmup`` rounds.

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
            times[name].append(_seconds(fn, device))
    return times


def median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def spread_ms(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of samples in seconds."""
    ms = [t * 1e3 for t in ts]
    qs = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return statistics.median(ms), qs[1], qs[7]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one function (:func:`interleaved` with a single contender)."""
    return spread_ms(interleaved({"fn": fn}, device, warmup, repeats)["fn"])


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


def hf_vitmae_step(model: torch.nn.Module, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                   amp_dtype: torch.dtype = torch.float32, adamw: bool = True) -> Callable[[], torch.Tensor]:
    """transformers' ``ViTMAEForPreTraining`` with ``model``'s config and weights, as one step on a fixed batch: the
    forward (under autocast unless fp32; with ``noise``, the same masks as fastmae's), the backward and, with
    ``adamw``, torch's AdamW at MAE's settings; the step returns the loss (a device tensor, no host sync). The
    outside reference of the step benchmarks and the GPU report."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from fastmae.convert import hf_config_kwargs, to_hf_vitmae

    hf = ViTMAEForPreTraining(ViTMAEConfig(**hf_config_kwargs(model), mask_ratio=0.75)).to(pixel_values.device)
    hf.load_state_dict(to_hf_vitmae(model.state_dict()))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05) if adamw else None
    extra = {} if noise is None else {"noise": noise}
    autocast = torch.autocast(pixel_values.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    def step():
        with autocast:
            loss = hf(pixel_values=pixel_values, **extra).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def stamp(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "git": git_sha(), "date": time.strftime("%Y-%m-%d")}
