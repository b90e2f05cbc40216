"""Analytic FLOP count of an MAE training step (matmuls only; 1 multiply-add = 2 FLOPs)."""

from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (no sparsity).
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _transformer(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    per_block = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim  # qkv, proj
    per_block += 2 * 2 * tokens * dim * int(dim * mlp_ratio)  # fc1, fc2
    per_block += 2 * 2 * tokens * tokens * dim  # QK^T and AV
    return depth * per_block


def mae_forward_flops(model, img_size: int, mask_ratio: float) -> float:
    """Forward FLOPs per image of a fastmae MAE at ``img_size`` and ``mask_ratio``."""
    p = model.patch_size
    L = (img_size // p) ** 2
    vis = int(L * (1 - mask_ratio))
    P = p * p * model.in_chans
    D, Dd = model.embed_dim, model.decoder_embed_dim
    mlp = model.blocks[0].mlp.fc1.out_features / D
    f = 2 * vis * P * D
    f += _transformer(1 + vis, D, len(model.blocks), mlp)
    f += 2 * (1 + vis) * D * Dd
    f += _transformer(1 + L, Dd, len(model.decoder_blocks), mlp)
    f += 2 * L * Dd * P
    return float(f)


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of the device if known (override with FASTMAE_PEAK_TFLOPS)."""
    import os

    if os.environ.get("FASTMAE_PEAK_TFLOPS"):
        return float(os.environ["FASTMAE_PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in _PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None
