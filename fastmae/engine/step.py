"""One optimizer step, and the device-side statistics around it.

:func:`train_step` is the one step of every training loop (pretraining, the evaluation protocols, the
digits demo) and of the step benchmarks: a loss function over a micro-batch (images, or images and
labels), gradient accumulation, autocast, DDP ``no_sync`` on all but the last micro-batch, gradient norm (and
clipping), and a non-finite loss or gradient skipping the update inside fused AdamW
(``found_inf``). Nothing in it waits for the device: loss, grad norm and bad-step counters are
tensors that :class:`StepStats` accumulates and :class:`LogWindow` reads once per log window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmae.engine import faults
from fastmae.engine.optim import grad_norm_


class TrainingAborted(RuntimeError):
    """Raised for a run that cannot continue (e.g. K non-finite steps in a row); the message says why."""


def resolve_precision(precision: str, device: torch.device, cpu_auto: str = "native") -> torch.dtype:
    """Autocast dtype of a ``precision`` setting ("auto", "fp32", "bf16", "fp16") on ``device``.

    ``auto`` is bf16 on CUDA (fp16 where bf16 is missing). On CPU it follows ``cpu_auto``: "native" is bf16
    where the CPU computes it natively (pretraining), "fp32" keeps full precision (the evaluation protocols:
    their tiny CPU models run faster, and reproduce exactly, in fp32).
    """
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs CUDA (it trains with a grad scaler); use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_auto == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@dataclass
class StepStats:
    """Device-side accumulators: loss sum and good-step count of the log window, bad steps in total and in a row,
    the last gradient norm."""

    loss_sum: Tensor
    good: Tensor
    bad_total: Tensor
    bad_run: Tensor
    grad_norm: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str) -> StepStats:
        return cls(*(torch.zeros((), device=device) for _ in range(5)))

    def update(self, loss: Tensor, bad: Tensor, grad_norm: Tensor) -> None:
        """Count one step; a bad step (``bad`` = 1.0) adds no loss."""
        self.loss_sum += torch.where(bad > 0, torch.zeros_like(loss), loss)
        self.good += 1 - bad
        self.bad_total += bad
        self.bad_run = (self.bad_run + bad) * bad
        self.grad_norm = grad_norm.detach()

    def reset_window(self) -> None:
        self.loss_sum.zero_()
        self.good.zero_()


def _device_type(batch) -> str:
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).device.type


def train_step(
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    next_batch: Callable[[], object],
    *,
    accum_iter: int = 1,
    mask_ratio: float | None = None,
    amp_dtype: torch.dtype = torch.float32,
    clip_grad: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    stats: StepStats | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimizer step over ``accum_iter`` micro-batches; returns (loss, bad) as device tensors.

    loss_fn: ``loss_fn(batch)`` is the scalar loss of a micro-batch (a tensor of images, or a tuple such as
    (images, labels)). mask_ratio: set for a masked-image model, whose ``loss_fn(batch, mask_ratio=...)[0]``
    is the loss (a model, its DDP wrapper or a compiled one).
    params: the trainable parameters (gradient norm and clipping). next_batch: the next micro-batch, on device.
    no_sync: the DDP wrapper's ``no_sync`` (gradients are all-reduced on the last micro-batch only), or None.
    clip_grad: max gradient norm, 0 = no clipping. The loss is the mean over micro-batches; ``bad`` is 1.0
    when the loss or the gradient norm is not finite, and then the optimizer leaves the parameters alone
    (fused AdamW and the grad scaler skip on the device; other optimizers get their gradients zeroed).
    """
    if mask_ratio is not None:
        model = loss_fn
        loss_fn = lambda batch: model(batch, mask_ratio=mask_ratio)[0]  # noqa: E731
    step_loss = None
    autocast = amp_dtype != torch.float32
    for micro in range(accum_iter):
        batch = next_batch()
        ctx = no_sync() if no_sync is not None and micro < accum_iter - 1 else nullcontext()
        with ctx, torch.autocast(_device_type(batch), dtype=amp_dtype, enabled=autocast):
            loss = faults.poison(loss_fn(batch)) / accum_iter
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    gnorm = grad_norm_(params, clip_grad)  # clip_grad 0: the norm only, no pass that rewrites every gradient
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor norm; replicate it (a collective, not a host sync)
        gnorm = gnorm.full_tensor()
    bad = (~torch.isfinite(gnorm) | ~torch.isfinite(step_loss)).float()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        # Fused AdamW skips the update on the device when found_inf is 1: no host round trip.
        optimizer.found_inf = bad
        if not _skips_on_found_inf(optimizer):
            _zero_bad_grads(params, bad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stats is not None:
        stats.update(step_loss, bad, gnorm)
    return step_loss, bad


def _skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def _zero_bad_grads(params: list[Tensor], bad: Tensor) -> None:
    """An optimizer that ignores ``found_inf`` (LARS, foreach AdamW) gets zero gradients on a bad step, on the
    device: its update is then weight decay and momentum only, never a NaN in the weights."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(torch.where(bad > 0, torch.zeros_like(p.grad), p.grad))


class BatchStream:
    """Micro-batches on the device, endlessly: an exhausted epoch starts the next one (``set_epoch``)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self._it = iter(loader)

    def __call__(self) -> Tensor:
        batch = next(self._it, None)
        if batch is None:  # epoch boundary
            self.loader.set_epoch(self.loader.state_dict()["epoch"] + 1)
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch[0].to(self.device, non_blocking=True)


class LogWindow:
    """The steps between two log rows: throughput, MFU, and the one deliberate host sync per window."""

    def __init__(self, samples_per_step: int, start_step: int, steps_per_epoch: int,
                 flops_per_sample: float | None = None, peak_flops: float | None = None):
        self.samples_per_step, self.start_step, self.steps_per_epoch = samples_per_step, start_step, steps_per_epoch
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.steps, self.t0 = 0, time.perf_counter()
        self.timed_samples, self.timed_s = 0, 0.0
        self.last_row: dict = {}
        self.bad_run = 0

    def tick(self) -> None:
        self.steps += 1

    @contextmanager
    def paused(self):
        """Time spent inside (e.g. an online evaluation between steps) does not count as the window's."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def close(self, step: int, stats: StepStats, lr: Tensor, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> dict:
        """The log row of the window ending at ``step``; resets the window. ``reduce`` averages the loss over ranks."""
        # Deliberate sync, the only one per log window: all device-side statistics in one transfer.
        values = torch.stack([reduce(stats.loss_sum / stats.good.clamp(min=1)), lr, stats.grad_norm, stats.bad_total,
                              stats.bad_run])
        loss, lr_now, gnorm, n_bad, n_bad_run = values.tolist()
        elapsed = time.perf_counter() - self.t0
        sample_s = self.steps * self.samples_per_step / elapsed
        if step - self.steps > self.start_step:  # the first window holds compile and warm-up
            self.timed_samples += self.steps * self.samples_per_step
            self.timed_s += elapsed
        row = {"epoch": step / self.steps_per_epoch, "loss": loss, "lr": lr_now, "grad_norm": gnorm, "img_s": sample_s,
               "skipped": int(n_bad)}
        if self.flops_per_sample and self.peak_flops:
            row["mfu"] = sample_s * self.flops_per_sample / self.peak_flops
        self.last_row, self.bad_run = row, int(n_bad_run)
        stats.reset_window()
        self.steps, self.t0 = 0, time.perf_counter()
        return row

    def check_bad_run(self, max_bad_steps: int) -> None:
        """Abort after ``max_bad_steps`` non-finite steps in a row (as of the last :meth:`close`)."""
        if self.bad_run >= max_bad_steps:
            raise TrainingAborted(
                f"{self.bad_run} consecutive steps had a non-finite loss or gradient "
                f"(max_bad_steps={max_bad_steps}); lower the learning rate or check the data"
            )

    def summary(self) -> dict:
        """The run summary's throughput: ``img_s`` and what it covers."""
        return {"img_s": self.throughput(),
                "img_s_note": "after warm-up" if self.timed_s else "one log window, start-up included"}

    def throughput(self) -> float | None:
        """Samples per second after the first (warm-up) window, or the last window's if there was only one."""
        return self.timed_samples / self.timed_s if self.timed_s else self.last_row.get("img_s")
