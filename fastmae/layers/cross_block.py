"""Pre-norm cross-attention block: x + attn(norm1(x), memory), then x + mlp(norm2(x)).

CrossMAE's decoder block. It has no self-attention: the tokens of ``x`` (queries) interact only
with ``memory`` (the encoder's visible tokens, already projected to the decoder width). The
cross-attention sits where timm's Block has its attention (``attn``: ``q``, ``kv``, ``proj``), so tools
that read ``blocks[i].attn.num_heads`` work on either decoder. ``residual_dtype`` is Block's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from fastmae.layers.block import RESIDUAL_DTYPES
from fastmae.layers.cross_attention import CrossAttention


class CrossBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        residual_dtype: str = "fp32",
    ):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {tuple(RESIDUAL_DTYPES)}, got {residual_dtype!r}")
        self.residual_dtype = RESIDUAL_DTYPES[residual_dtype]
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x: (N, Tq, D) queries; memory: (N, Tk, D) -> (N, Tq, D)"""
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.residual_dtype)  # as in Block: the query stream in bf16 under autocast
        x = x + self.attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))
