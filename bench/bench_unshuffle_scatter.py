"""K2 microbenchmark: decoder input = unshuffle the visible tokens + mask token + position table.

    python bench/bench_unshuffle_scatter.py [--batch 256] [--cpu-batch 16]

MAE's decoder is 512 wide for ViT-B/16 and ViT-L/16 alike (196 tokens, 49 visible); ViT-H/14
has 256 tokens (64 visible). Under bf16 autocast the decoder embedding is bf16 and the fixed
fp32 position table promotes the sum to fp32, as in the model.
"""

from __future__ import annotations

import torch
from _common import Case, parse_args, run_bench

from fastmae import ops
from fastmae import reference as R


def _case(name: str, L: int, ratio: float, D: int, x_dtype: torch.dtype, pos_dtype: torch.dtype) -> Case:
    n_vis = int(L * (1 - ratio))
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

    def ref(x: dict) -> torch.Tensor:
        return R.unshuffle_scatter(x["x"], x["mt"], x["ids"], x["pos"])

    def fused(x: dict) -> torch.Tensor:
        return ops.unshuffle_scatter(x["x"], x["mt"], x["ids"], x["pos"])

    def ideal(batch: int, kind: str) -> int:
        ids = batch * L * 8
        fwd = batch * (1 + n_vis) * D * xb + (1 + L) * D * pb + D * 4 + ids + batch * (1 + L) * D * ob
        # Backward: read the output gradient once, write the visible tokens' gradient and the mask token's.
        bwd = batch * (1 + L) * D * ob + ids + batch * (1 + n_vis) * D * xb + D * 4
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[kind]

    note = f"x {str(x_dtype).split('.')[-1]} + pos {str(pos_dtype).split('.')[-1]}, D={D}"
    return Case(name, make, ref, fused, ("x", "mt"), ideal, note=note)


def main() -> None:
    args = parse_args(__doc__)
    cases = [
        _case("vit_b16/l16 decoder 512 bf16+fp32", 196, 0.75, 512, torch.bfloat16, torch.float32),
        _case("vit_b16/l16 decoder 512 fp32", 196, 0.75, 512, torch.float32, torch.float32),
        _case("vit_h14 decoder 512 bf16+fp32", 256, 0.75, 512, torch.bfloat16, torch.float32),
    ]
    run_bench("K2 unshuffle_scatter", cases, args)


if __name__ == "__main__":
    main()
