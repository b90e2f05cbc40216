"""K3 microbenchmark: MAE's normalized-pixel loss on the masked patches, forward + backward.

    python bench/bench_masked_recon_loss.py [--batch 256] [--cpu-batch 16]

ViT-B/16 and ViT-L/16 share the shape (224 px, patch 16, 147 masked of 196 patches, P = 768);
ViT-H/14 has P = 588 (192 masked of 256). Predictions cover all patches, as the model's decoder
produces them; images come as DALI delivers them (uint8 NHWC) or as float NCHW.
"""

from __future__ import annotations

import torch
from _common import Case, parse_args, run_bench

from fastmae import ops
from fastmae import reference as R

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _case(name: str, size: int, p: int, ratio: float, src: str, pred_dtype: torch.dtype) -> Case:
    L = (size // p) ** 2
    n_mask = L - int(L * (1 - ratio))
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

    def ref(x: dict) -> torch.Tensor:
        return R.masked_recon_loss(x["pred"], x["imgs"], x["ids"], p, True, "mse", x["mean"], x["std"])

    def fused(x: dict) -> torch.Tensor:
        return ops.masked_recon_loss(x["pred"], x["imgs"], x["ids"], p, True, "mse", x["mean"], x["std"])

    def ideal(batch: int, kind: str) -> int:
        ids = batch * n_mask * 8
        reads = batch * n_mask * P * (in_b + pb) + ids
        fwd = reads + batch * n_mask * 4
        # Backward: the target is recomputed (same reads), the (N, L) uint8 mask is zeroed and scattered, and every
        # row of the (N, L, P) gradient is written once (zeros for visible rows).
        bwd = reads + 3 * batch * L + batch * L * P * pb
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[kind]

    note = f"{src} imgs, {str(pred_dtype).split('.')[-1]} pred, norm_pix mse, P={P}"
    return Case(name, make, ref, fused, ("pred",), ideal, note=note)


def main() -> None:
    args = parse_args(__doc__)
    cases = [
        _case("vit_b16/l16 uint8 imgs, bf16 pred", 224, 16, 0.75, "uint8", torch.bfloat16),
        _case("vit_b16/l16 fp32 imgs, fp32 pred", 224, 16, 0.75, "float32", torch.float32),
        _case("vit_h14 uint8 imgs, bf16 pred", 224, 14, 0.75, "uint8", torch.bfloat16),
    ]
    run_bench("K3 masked_recon_loss", cases, args)


if __name__ == "__main__":
    main()
