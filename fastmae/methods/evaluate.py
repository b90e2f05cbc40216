"""Held-out loss of a SimMIM or VideoMAE model with fixed masks, for the end-of-run summary.

The masks come from a private generator (seed 1234), so the number is comparable across runs and the
training RNG stays untouched.
"""

from __future__ import annotations

import torch

from fastmae.methods.simmim import SimMIMViT
from fastmae.methods.videomae import VideoMAE

__all__ = ["noise_shape", "evaluate_family"]


def noise_shape(model, batch: torch.Tensor) -> tuple[int, int]:
    """The ``noise`` shape a family model's forward takes for ``batch``."""
    N = batch.shape[0]
    if isinstance(model, SimMIMViT):
        H = batch.shape[1] if batch.dtype == torch.uint8 else batch.shape[2]
        W = batch.shape[2] if batch.dtype == torch.uint8 else batch.shape[3]
        return N, (H // model.mask_patch_size) * (W // model.mask_patch_size)
    if isinstance(model, VideoMAE):
        return N, model.grid_size[1] * model.grid_size[2]
    raise TypeError(f"not a SimMIM or VideoMAE model: {type(model).__name__}")


@torch.no_grad()
def evaluate_family(model, loader, device: torch.device, mask_ratio: float, amp_dtype: torch.dtype = torch.float32,
                    seed: int = 1234) -> dict:
    """-> {"val_loss": mean loss per sample, "val_samples": count} over one pass of ``loader``."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch, _ in loader:
        batch = batch.to(device)
        noise = torch.rand(noise_shape(model, batch), generator=gen).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = model(batch, mask_ratio=mask_ratio, noise=noise)[0]
        total += loss.item() * batch.shape[0]  # evaluation, not the training step: a sync per batch is fine
        count += batch.shape[0]
    model.train(was_training)
    return {"val_loss": total / count if count else None, "val_samples": count}
