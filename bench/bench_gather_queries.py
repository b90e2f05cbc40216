"""CrossMAE decoder queries microbenchmark: mask token + positions of the patches to predict, forward + backward.

    python bench/bench_gather_queries.py [--batch 256] [--cpu-batch 16]

CrossMAE (prediction ratio 0.25 of the patches, all masked): ViT-B/16 and ViT-L/16 predict 49 of 196
patches with a 512-wide decoder; ViT-H/14 64 of 256. The mask token is an fp32 parameter; the
position table is fp32 (fixed sin-cos, or trainable: then its gradient is computed too).
"""

from __future__ import annotations

import torch
from _common import Case, parse_args, run_bench

from fastmae import ops
from fastmae import reference as R


def _case(name: str, L: int, L_t: int, D: int, pos_trainable: bool) -> Case:
    def make(batch: int, device: torch.device) -> dict:
        ids = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, :L_t]
        pos = torch.randn(1, 1 + L, D, device=device, requires_grad=pos_trainable)
        return dict(mt=torch.randn(D, device=device, requires_grad=True), pos=pos, ids=ids)

    def ref(x: dict) -> torch.Tensor:
        return R.gather_queries(x["mt"], x["pos"], x["ids"])

    def fused(x: dict) -> torch.Tensor:
        return ops.gather_queries(x["mt"], x["pos"], x["ids"])

    def ideal(batch: int, kind: str) -> int:
        ids = batch * L_t * 8
        out = batch * L_t * D * 4
        fwd = ids + out + (1 + L) * D * 4 + D * 4  # the position table is read from DRAM once (it fits in L2)
        # Backward: build the (N, L) slot map, read the output gradient once, write the (L, D) partials and the grads.
        bwd = ids + 2 * batch * L * 4 + out + L * D * 4 * 2 + D * 4 + ((1 + L) * D * 4 if pos_trainable else 0)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[kind]

    grad = ("mt", "pos") if pos_trainable else ("mt",)
    note = f"L_t={L_t} of {L}, D={D}, pos {'trainable' if pos_trainable else 'fixed'}"
    return Case(name, make, ref, fused, grad, ideal, note=note)


def main() -> None:
    args = parse_args(__doc__)
    cases = [
        _case("vit_b16/l16 crossmae 49 of 196, D=512", 196, 49, 512, False),
        _case("vit_b16/l16 crossmae 49 of 196, D=512, trainable pos", 196, 49, 512, True),
        _case("vit_h14 crossmae 64 of 256, D=512", 256, 64, 512, False),
    ]
    run_bench("gather_queries", cases, args)


if __name__ == "__main__":
    main()
