"""Reconstruction grids: original | masked | reconstruction | reconstruction with visible patches pasted.

With norm-pix loss the model predicts each patch normalized by its own mean
and std, so raw predictions look like noise; they are mapped back with each
patch's *true* mean and std before display (a common source of confusion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastmae.reference import patchify, unpatchify


@torch.no_grad()
def reconstruct(model, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None) -> dict[str, Tensor]:
    """imgs: normalized float (N, C, H, W) -> dict of (N, C, H, W) panels in the same normalized space."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):  # SimMIM predicts the normalized image itself
        target = patchify(imgs.float(), p)
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    rec = unpatchify(pred, p, model.in_chans, grid)
    m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * model.in_chans), p, model.in_chans, grid)
    return {"original": imgs.float(), "masked": imgs.float() * (1 - m), "reconstruction": rec,
            "pasted": imgs.float() * (1 - m) + rec * m, "mask": m}


def to_uint8(x: Tensor, mean, std) -> np.ndarray:
    """Normalized (C, H, W) -> uint8 (H, W, C) for display."""
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    img = (x.cpu() * std + mean).clamp(0, 1)
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def save_grid(panels: dict[str, Tensor], path: str | Path, mean, std, scale: int = 2) -> Path:
    """Write a PNG with one row per image and the four panels as columns."""
    cols = ["original", "masked", "reconstruction", "pasted"]
    N, _, H, W = panels["original"].shape
    pad = 2
    canvas = np.full((N * (H + pad) + pad, len(cols) * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(N):
        for j, name in enumerate(cols):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            tile = to_uint8(panels[name][i], mean, std)
            if name == "masked":
                # Masked patches in mid-gray rather than the normalized-space zero.
                hidden = panels["mask"][i, 0].cpu().numpy() > 0.5
                tile = tile.copy()
                tile[hidden] = 128
            canvas[y : y + H, x : x + W] = tile
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path
