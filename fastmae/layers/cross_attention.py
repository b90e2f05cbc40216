"""Multi-head cross-attention: queries from one sequence, keys and values from another.

CrossMAE's decoder reads the encoder this way: the queries are mask tokens at the positions to
predict, the keys and values the visible tokens. Queries never attend to each other, so every
predicted patch is decoded independently and any subset of them can be decoded.

The kernel follows the process-wide policy of :mod:`fastmae.layers.attention` (``FASTMAE_ATTN``),
chosen per shape by its :func:`choose_attention_backend` (sequence length = the number of keys):
FlashAttention-3 or -2 (flash-attn's packed-KV kernel) where installed and suited, else
:func:`~fastmae.layers.attention.dense_attention` (SDPA preferring the chosen kernel, or ``eager``), as
self-attention does.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastmae.layers.attention import (
    attention_backend,
    attention_capabilities,
    check_heads,
    choose_attention_backend,
    dense_attention,
)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        attention_backend()  # resolve (and validate) the process-wide policy before any forward is traced
        attention_capabilities()

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x: queries (B, Tq, D); memory: keys/values (B, Tk, D) -> (B, Tq, D)"""
        B, Tq, D = x.shape
        Tk = memory.shape[1]
        q = self.q(x).reshape(B, Tq, self.num_heads, self.head_dim)
        kv = self.kv(memory).reshape(B, Tk, 2, self.num_heads, self.head_dim)
        caps = attention_capabilities()
        kernel = choose_attention_backend(self.head_dim, Tk, q.dtype, q.device.type, caps, attention_backend())
        if kernel == "flash_attn_3":
            from flash_attn_interface import flash_attn_func

            k, v = kv.unbind(2)  # each (B, Tk, H, Dh)
            out = flash_attn_func(q, k, v, softmax_scale=self.scale)
            out = (out[0] if isinstance(out, tuple) else out).reshape(B, Tq, D)
        elif kernel == "flash_attn_2":
            from flash_attn import flash_attn_kvpacked_func

            out = flash_attn_kvpacked_func(q, kv, softmax_scale=self.scale).reshape(B, Tq, D)
        else:
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, Tk, Dh)
            out = dense_attention(q.transpose(1, 2), k, v, kernel, self.scale, caps).transpose(1, 2).reshape(B, Tq, D)
        return self.proj(out)
