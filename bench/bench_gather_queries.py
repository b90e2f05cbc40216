"""CrossMAE decoder queries microbenchmark (pytest-benchmark): mask token + positions of the patches to predict,
via fastmae.ops.

    python -m pytest bench/bench_gather_queries.py --benchmark-only -q      # CPU: reference eager vs compiled
    FASTMAE_BENCH_SCALE=gpu python -m pytest bench/bench_gather_queries.py --benchmark-only
    python bench/bench_gather_queries.py                                    # + ratio table (see bench/_common.py)

CrossMAE at prediction ratio 0.25 of the patches (all masked): ViT-B/16 and ViT-L/16 predict 49 of 196
patches with a 512-wide decoder (one id covers both); ViT-H/14 64 of 256. The mask token is an fp32
parameter; the position table is fp32, fixed (sin-cos) or trainable (then its gradient is computed too).
"""

from __future__ import annotations

import torch
from _common import Case, bench_test, main, scale

from fastmae import ops


def _case(scale_name: str, name: str, L: int, D: int, pos_trainable: bool) -> Case:
    if scale_name == "tiny":
        L, D = 8, 32
    L_t = L // 4

    def make(batch: int, device: torch.device) -> dict:
        ids = torch.argsort(torch.rand(batch, L, device=device), dim=1)[:, :L_t]
        pos = torch.randn(1, 1 + L, D, device=device, requires_grad=pos_trainable)
        return dict(mt=torch.randn(D, device=device, requires_grad=True), pos=pos, ids=ids)

    def op(x: dict) -> torch.Tensor:
        return ops.gather_queries(x["mt"], x["pos"], x["ids"])

    def ideal(batch: int, kind: str) -> int:
        ids = batch * L_t * 8
        out = batch * L_t * D * 4
        if kind == "fwd":
            return ids + out + (1 + L) * D * 4 + D * 4  # the position table is read from DRAM once (it fits in L2)
        # Build the (N, L) slot map, read the output gradient once, write and reduce the (L, D) partials, the grads.
        return ids + 2 * batch * L * 4 + out + 2 * L * D * 4 + D * 4 + ((1 + L) * D * 4 if pos_trainable else 0)

    grad = ("mt", "pos") if pos_trainable else ("mt",)
    note = f"L_t={L_t} of {L}, D={D}, pos {'trainable' if pos_trainable else 'fixed'}"
    return Case(name, make, op, grad, ideal, note=note)


def cases(scale_name: str) -> list[Case]:
    """The benchmark shapes at a scale of ``_common.BATCH`` (the GPU report asks for its own)."""
    return [
        _case(scale_name, "vit_b16_l16 crossmae 49 of 196 D=512", 196, 512, False),
        _case(scale_name, "vit_b16_l16 crossmae 49 of 196 D=512 trainable pos", 196, 512, True),
        _case(scale_name, "vit_h14 crossmae 64 of 256 D=512", 256, 512, False),
    ]


CASES = cases(scale())
test_gather_queries = bench_test(CASES)


if __name__ == "__main__":
    raise SystemExit(main(__file__))
