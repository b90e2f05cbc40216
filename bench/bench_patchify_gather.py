"""K1 microbenchmark (pytest-benchmark): patchify + normalize + gather of the visible patches, via fastmae.ops.

    python -m pytest bench/bench_patchify_gather.py --benchmark-only -q     # CPU: reference eager vs compiled
    FASTMAE_BENCH_SCALE=gpu python -m pytest bench/bench_patchify_gather.py --benchmark-only
    python bench/bench_patchify_gather.py                                   # + ratio table (see bench/_common.py)

ViT-B/16 and ViT-L/16 share this kernel's shape (224 px, patch 16, P = 768, 49 visible of 196), so
one id covers both; ViT-H/14 has a patch dim that is not a power of two (P = 588, 64 visible of 256).
Images come as the loaders deliver them (uint8 NHWC, normalized in the kernel, no gradient) and as
float NCHW (with the image gradient, for the backward row).
"""

from __future__ import annotations

import torch
from _common import Case, bench_images, bench_test, element_bytes, image_size, main, scale

from fastmae import ops


def _case(scale_name: str, name: str, p: int, src: str, out_dtype: torch.dtype) -> Case:
    size = image_size(p, scale_name)
    L = (size // p) ** 2
    n_vis = int(L * 0.25)
    P = p * p * 3
    in_b, out_b = element_bytes(src), element_bytes(out_dtype)

    def make(batch: int, device: torch.device) -> dict:
        ids_keep = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, :n_vis]
        imgs, mean, std = bench_images(src, batch, size, device, requires_grad=True)
        return dict(imgs=imgs, ids=ids_keep, mean=mean, std=std)

    def op(x: dict) -> torch.Tensor:
        return ops.patchify_gather(x["imgs"], x["ids"], p, x["mean"], x["std"], out_dtype)

    def ideal(batch: int, kind: str) -> int:
        ids = batch * n_vis * 8
        if kind == "fwd":
            return batch * n_vis * P * (in_b + out_b) + ids
        # Read the patch gradient, write the whole image gradient once (zeros at masked pixels).
        return batch * n_vis * P * out_b + batch * 3 * size * size * in_b + ids

    grad = () if src == "uint8" else ("imgs",)
    return Case(name, make, op, grad, ideal, note=f"{src}->{str(out_dtype).split('.')[-1]} P={P}")


def cases(scale_name: str) -> list[Case]:
    """The benchmark shapes at a scale of ``_common.BATCH`` (the GPU report asks for its own)."""
    return [
        _case(scale_name, "vit_b16_l16 uint8 NHWC->bf16", 16, "uint8", torch.bfloat16),
        _case(scale_name, "vit_b16_l16 fp32 NCHW->bf16", 16, "float32", torch.bfloat16),
        _case(scale_name, "vit_h14 uint8 NHWC->bf16", 14, "uint8", torch.bfloat16),
    ]


CASES = cases(scale())
test_patchify_gather = bench_test(CASES)


if __name__ == "__main__":
    raise SystemExit(main(__file__))
