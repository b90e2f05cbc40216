"""K2 microbenchmark (pytest-benchmark): decoder input = unshuffle the visible tokens + mask token + positions,
via fastmae.ops.

    python -m pytest bench/bench_unshuffle_scatter.py --benchmark-only -q   # CPU: reference eager vs compiled
    FASTMAE_BENCH_SCALE=gpu python -m pytest bench/bench_unshuffle_scatter.py --benchmark-only
    python bench/bench_unshuffle_scatter.py                                 # + ratio table (see bench/_common.py)

MAE's decoder is 512 wide for ViT-B/16, ViT-L/16 and ViT-H/14; B and L have 196 tokens (49 visible),
so one id covers both; H has 256 (64 visible). Under bf16 autocast the decoder embedding is bf16 and
the fixed fp32 position table promotes the sum to fp32, as in the model.
"""

from __future__ import annotations

import torch
from _common import Case, bench_test, main, scale

from fastmae import ops


def _case(scale_name: str, name: str, L: int, D: int, x_dtype: torch.dtype, pos_dtype: torch.dtype) -> Case:
    if scale_name == "tiny":
        L, D = 4, 32
    n_vis = int(L * 0.25)
    xb = torch.finfo(x_dtype).bits // 8
    pb = torch.finfo(pos_dtype).bits // 8
    ob = torch.finfo(torch.promote_types(x_dtype, pos_dtype)).bits // 8

    def make(batch: int, device: torch.device) -> dict:
        ids_restore = torch.argsort(torch.argsort(torch.rand(batch, L, device=device), dim=1), dim=1)
        return dict(
            x=torch.randn(batch, 1 + n_vis, D, device=device, dtype=x_dtype, requires_grad=True),
            mt=torch.randn(D, device=device, requires_grad=True),
            ids=ids_restore,
            pos=torch.randn(1, 1 + L, D, device=device, dtype=pos_dtype),
        )

    def op(x: dict) -> torch.Tensor:
        return ops.unshuffle_scatter(x["x"], x["mt"], x["ids"], x["pos"])

    def ideal(batch: int, kind: str) -> int:
        ids = batch * L * 8
        if kind == "fwd":
            return batch * (1 + n_vis) * D * xb + (1 + L) * D * pb + D * 4 + ids + batch * (1 + L) * D * ob
        # Read the output gradient once, write the visible tokens' gradient and the mask token's.
        return batch * (1 + L) * D * ob + ids + batch * (1 + n_vis) * D * xb + D * 4

    note = f"x {str(x_dtype).split('.')[-1]} + pos {str(pos_dtype).split('.')[-1]}, D={D}"
    return Case(name, make, op, ("x", "mt"), ideal, note=note)


def cases(scale_name: str) -> list[Case]:
    """The benchmark shapes at a scale of ``_common.BATCH`` (the GPU report asks for its own)."""
    return [
        _case(scale_name, "vit_b16_l16 decoder 512 bf16+fp32", 196, 512, torch.bfloat16, torch.float32),
        # decoder_input_dtype=autocast (issue 22): the table in bf16, so the decoder input is written in bf16.
        _case(scale_name, "vit_b16_l16 decoder 512 bf16+bf16", 196, 512, torch.bfloat16, torch.bfloat16),
        _case(scale_name, "vit_b16_l16 decoder 512 fp32", 196, 512, torch.float32, torch.float32),
        _case(scale_name, "vit_h14 decoder 512 bf16+fp32", 256, 512, torch.bfloat16, torch.float32),
    ]


CASES = cases(scale())
test_unshuffle_scatter = bench_test(CASES)


if __name__ == "__main__":
    raise SystemExit(main(__file__))
