"""K3 microbenchmark (pytest-benchmark): MAE's normalized-pixel loss on the masked patches, forward and backward,
via fastmae.ops.

    python -m pytest bench/bench_masked_recon_loss.py --benchmark-only -q   # CPU: reference eager vs compiled
    FASTMAE_BENCH_SCALE=gpu python -m pytest bench/bench_masked_recon_loss.py --benchmark-only
    python bench/bench_masked_recon_loss.py                                 # + ratio table (see bench/_common.py)

ViT-B/16 and ViT-L/16 share the shape (224 px, patch 16, 147 masked of 196 patches, P = 768), so one id
covers both; ViT-H/14 has P = 588 (192 masked of 256). Predictions cover all patches, as MAE's decoder
produces them; images come as the loaders deliver them (uint8 NHWC) or as float NCHW. The backward row
times the gradient alone for an upstream gradient of 0.5 (the kernel reads it on the device).
"""

from __future__ import annotations

import torch
from _common import Case, bench_images, bench_test, element_bytes, image_size, main, scale

from fastmae import ops


def _case(scale_name: str, name: str, p: int, src: str, pred_dtype: torch.dtype) -> Case:
    size = image_size(p, scale_name)
    L = (size // p) ** 2
    n_mask = L - int(L * 0.25)
    P = p * p * 3
    in_b, pb = element_bytes(src), element_bytes(pred_dtype)

    def make(batch: int, device: torch.device) -> dict:
        ids_masked = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, L - n_mask:]
        imgs, mean, std = bench_images(src, batch, size, device)
        pred = torch.randn(batch, L, P, device=device, dtype=pred_dtype, requires_grad=True)
        return dict(pred=pred, imgs=imgs, ids=ids_masked, mean=mean, std=std)

    def op(x: dict) -> torch.Tensor:
        return ops.masked_recon_loss(x["pred"], x["imgs"], x["ids"], p, True, "mse", x["mean"], x["std"])

    def ideal(batch: int, kind: str) -> int:
        reads = batch * n_mask * P * (in_b + pb) + batch * n_mask * 8
        if kind == "fwd":
            return reads + batch * n_mask * 4
        # The target is recomputed (the same reads), the (N, L) uint8 mask is zeroed and scattered, and every row of
        # the (N, L, P) gradient is written once (zeros for visible rows).
        return reads + 3 * batch * L + batch * L * P * pb

    note = f"{src} imgs, {str(pred_dtype).split('.')[-1]} pred, norm_pix mse, P={P}"
    return Case(name, make, op, ("pred",), ideal, note=note)


def cases(scale_name: str) -> list[Case]:
    """The benchmark shapes at a scale of ``_common.BATCH`` (the GPU report asks for its own)."""
    return [
        _case(scale_name, "vit_b16_l16 uint8 imgs, bf16 pred", 16, "uint8", torch.bfloat16),
        _case(scale_name, "vit_b16_l16 fp32 imgs, fp32 pred", 16, "float32", torch.float32),
        _case(scale_name, "vit_h14 uint8 imgs, bf16 pred", 14, "uint8", torch.bfloat16),
    ]


CASES = cases(scale())
test_masked_recon_loss = bench_test(CASES)


if __name__ == "__main__":
    raise SystemExit(main(__file__))
