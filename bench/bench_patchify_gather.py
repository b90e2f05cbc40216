"""K1 microbenchmark: patchify + normalize + gather of the visible patches.

    python bench/bench_patchify_gather.py [--batch 256] [--cpu-batch 16]

ViT-B/16 and ViT-L/16 share this kernel's shape (224 px, patch 16, P = 768, 49 visible of 196);
ViT-H/14 adds a patch dim that is not a power of two (P = 588, 64 visible of 256).
"""

from __future__ import annotations

import torch
from _common import Case, parse_args, run_bench

from fastmae import ops
from fastmae import reference as R

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _case(name: str, size: int, p: int, ratio: float, src: str, out_dtype: torch.dtype) -> Case:
    L = (size // p) ** 2
    n_vis = int(L * (1 - ratio))
    P = p * p * 3
    in_b = 1 if src == "uint8" else torch.finfo(getattr(torch, src)).bits // 8
    out_b = torch.finfo(out_dtype).bits // 8

    def make(batch: int, device: torch.device) -> dict:
        ids_keep = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, :n_vis]
        if src == "uint8":
            imgs = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
            return dict(imgs=imgs, ids=ids_keep, mean=torch.tensor(MEAN, device=device),
                        std=torch.tensor(STD, device=device))
        imgs = torch.randn(batch, 3, size, size, device=device, dtype=getattr(torch, src), requires_grad=True)
        return dict(imgs=imgs, ids=ids_keep, mean=None, std=None)

    def ref(x: dict) -> torch.Tensor:
        return R.patchify_gather(x["imgs"], x["ids"], p, x["mean"], x["std"], out_dtype)

    def fused(x: dict) -> torch.Tensor:
        return ops.patchify_gather(x["imgs"], x["ids"], p, x["mean"], x["std"], out_dtype)

    def ideal(batch: int, kind: str) -> int:
        ids = batch * n_vis * 8
        fwd = batch * n_vis * P * (in_b + out_b) + ids
        # Backward: read the patch gradient, write the whole image gradient once (zeros at masked pixels).
        bwd = batch * n_vis * P * out_b + batch * 3 * size * size * in_b + ids
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[kind]

    grad = () if src == "uint8" else ("imgs",)
    return Case(name, make, ref, fused, grad, ideal, note=f"{src}->{str(out_dtype).split('.')[-1]} P={P}")


def main() -> None:
    args = parse_args(__doc__)
    cases = [
        _case("vit_b16/l16 uint8 NHWC->bf16", 224, 16, 0.75, "uint8", torch.bfloat16),
        _case("vit_b16/l16 fp32 NCHW->bf16", 224, 16, 0.75, "float32", torch.bfloat16),
        _case("vit_h14 uint8 NHWC->bf16", 224, 14, 0.75, "uint8", torch.bfloat16),
    ]
    run_bench("K1 patchify_gather", cases, args)


if __name__ == "__main__":
    main()
