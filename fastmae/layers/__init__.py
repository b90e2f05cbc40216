"""Model building blocks, one concept per file (names follow timm and the official MAE).

``Mlp`` and ``DropPath`` are timm's own (same parameter names ``fc1``/``fc2`` as the official model).
"""

from timm.layers import DropPath, Mlp

from fastmae.layers.attention import Attention, attention_backend, set_attention_backend
from fastmae.layers.block import Block
from fastmae.layers.cross_attention import CrossAttention
from fastmae.layers.cross_block import CrossBlock
from fastmae.layers.feature_fusion import FeatureFusion
from fastmae.layers.patch_embed import PatchEmbed
from fastmae.layers.pos_embed import sincos_2d, sinusoid_table
from fastmae.layers.tubelet_embed import TubeletEmbed
from fastmae.layers.weight_init import init_weights

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "CrossBlock",
    "DropPath",
    "FeatureFusion",
    "Mlp",
    "PatchEmbed",
    "TubeletEmbed",
    "attention_backend",
    "init_weights",
    "set_attention_backend",
    "sincos_2d",
    "sinusoid_table",
]
