"""Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

Under autocast the residual stream stays fp32 (the official numerics: the
fp32 position embeddings promote it, and each bf16 branch output is added in
fp32). ``residual_dtype="bf16"`` carries it in bf16 instead, halving the
residual traffic of every block; without autocast it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from fastmae.layers.attention import Attention

# None keeps whatever dtype arrives (fp32 under autocast, as the official code runs).
RESIDUAL_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        residual_dtype: str = "fp32",
    ):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {tuple(RESIDUAL_DTYPES)}, got {residual_dtype!r}")
        self.residual_dtype = RESIDUAL_DTYPES[residual_dtype]
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1 -> GELU (erf) -> fc2
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, T, D) -> (N, T, D)"""
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.residual_dtype)  # a no-op after the first block
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
