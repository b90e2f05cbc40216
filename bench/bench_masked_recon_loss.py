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

import pytest
import torch
from _common import MEAN, PASSES, STD, Case, backend_params, bench_op, image_size, main

from fastmae import ops


def _case(name: str, p: int, src: str, pred_dtype: torch.dtype) -> Case:
    size = image_size(p)
    L = (size // p) ** 2
    n_mask = L - int(L * 0.25)
    P = p * p * 3
    in_b = 1 if src == "uint8" else torch.finfo(getattr(torch, src)).bits // 8
    pb = torch.finfo(pred_dtype).bits // 8

    def make(batch: int, device: torch.device) -> dict:
        ids_masked = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, L - n_mask:]
        if src == "uint8":
            imgs = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
            mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
        else:
            imgs = torch.randn(batch, 3, size, size, device=device, dtype=getattr(torch, src))
            mean = std = None
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


CASES = [
    _case("vit_b16_l16 uint8 imgs, bf16 pred", 16, "uint8", torch.bfloat16),
    _case("vit_b16_l16 fp32 imgs, fp32 pred", 16, "float32", torch.float32),
    _case("vit_h14 uint8 imgs, bf16 pred", 14, "uint8", torch.bfloat16),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-").replace(",", ""))
def test_masked_recon_loss(benchmark, case, kind, backend):
    bench_op(benchmark, case, kind, backend)


if __name__ == "__main__":
    raise SystemExit(main(__file__))
