"""Pre-norm cross-attention block: x + attn(norm1(x), memory), then x + mlp(norm2(x)).

CrossMAE's decoder block. It has no self-attention: the tokens of ``x`` (queries) interact only
with ``memory`` (the encoder's visible tokens, already projected to the decoder width). The
cross-attention sits where timm's Block has its attention (``attn``: ``q``, ``kv``, ``proj``), so tools
that read ``blocks[i].attn.num_heads`` work on either decoder.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fastmae.layers.cross_attention import CrossAttention
from fastmae.layers.mlp import Mlp


class CrossBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x: (N, Tq, D) queries; memory: (N, Tk, D) -> (N, Tq, D)"""
        x = x + self.attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))
