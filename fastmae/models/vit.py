"""Vision Transformer encoder with the official MAE / timm parameter names.

The encoder embeds only the patches it is given (``ids_keep``): the fused
patchify+gather op extracts them straight from the image, so masked patches
are never read, embedded or stored. With ``ids_keep=None`` every patch is
embedded (downstream use). An optional classification head (``num_classes``)
with cls-token or global-average pooling serves linear probing and
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from fastmae import ops
from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.layers import Block, PatchEmbed, init_weights, sincos_2d

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        num_classes: int = 0,
        global_pool: bool = False,
        drop_path_rate: float = 0.0,
        learn_pos_embed: bool = False,
        pixel_mean: tuple[float, ...] = IMAGENET_MEAN,
        pixel_std: tuple[float, ...] = IMAGENET_STD,
        residual_dtype: str = "fp32",
    ):
        super().__init__()
        self.residual_dtype = residual_dtype  # "fp32" (official numerics) | "bf16" (residual stream in bf16 under autocast)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table for pretraining (as in MAE); fine-tuning may learn it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=learn_pos_embed)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # no tensor: builds on meta/fake devices
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm_layer,
                   residual_dtype=residual_dtype)
             for i in range(depth)]
        )
        # The official fine-tuning model replaces the final norm by fc_norm after pooling.
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        if len(pixel_mean) != in_chans or len(pixel_std) != in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {in_chans} values")
        # Not persistent: official checkpoints have no such keys.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)
        self._init_encoder_weights()

    def _init_encoder_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.patch_embed.grid_size, cls_token=True).unsqueeze(0))
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    # ---- input handling -------------------------------------------------------------------------------

    def check_images(self, imgs: Tensor) -> tuple[int, tuple[int, int]]:
        """Validate a batch and return (N, patch grid). Float (N, C, H, W) or uint8 (N, H, W, C)."""
        if not isinstance(imgs, Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.ndim != 4:
            raise ValueError(f"imgs must have 4 dims (N, C, H, W), or (N, H, W, C) for uint8; got shape {tuple(imgs.shape)}")
        if imgs.dtype == torch.uint8:
            N, H, W, C = imgs.shape
            layout = "(N, H, W, C) uint8"
        elif imgs.is_floating_point():
            N, C, H, W = imgs.shape
            layout = "(N, C, H, W) float"
        else:
            raise ValueError(f"imgs must be float (N, C, H, W) or uint8 (N, H, W, C), got dtype {imgs.dtype}")
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels in {layout} images, got {C} (shape {tuple(imgs.shape)})")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        if N == 0:
            raise ValueError("empty batch")
        return N, (H // p, W // p)

    def _norm_args(self, imgs: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if imgs.dtype == torch.uint8:
            return self.pixel_mean, self.pixel_std
        return None, None

    def _compute_dtype(self, imgs: Tensor) -> torch.dtype:
        dev = imgs.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.patch_embed.proj.weight.dtype

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """Position table (1, 1 + gh*gw, D) for a patch grid; other resolutions get a new table."""
        if tuple(grid) == self.patch_embed.grid_size:
            return self.pos_embed
        if self.pos_embed.requires_grad:
            return resample_abs_pos_embed(self.pos_embed, list(grid), num_prefix_tokens=1)
        table = sincos_2d(self.embed_dim, grid, cls_token=True).unsqueeze(0)
        return table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)

    # ---- encoder ----------------------------------------------------------------------------------------

    def embed_patches(self, imgs: Tensor, ids_keep: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """Embedded tokens with positions, cls first: (N, 1 + L_vis, D)."""
        N = imgs.shape[0]
        L = grid[0] * grid[1]
        if ids_keep is None:
            ids_keep = torch.arange(L, device=imgs.device).expand(N, L)
        mean, std = self._norm_args(imgs)
        patches = ops.patchify_gather(imgs, ids_keep, self.patch_size, mean, std, self._compute_dtype(imgs))
        pos = self.pos_embed_for(grid)
        pos_vis = torch.gather(pos[:, 1:, :].expand(N, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        x = self.patch_embed(patches) + pos_vis
        cls = (self.cls_token + pos[:, :1, :]).expand(N, -1, -1)
        return torch.cat([cls.to(x.dtype), x], dim=1)

    def forward_features(self, imgs: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """imgs: (N, C, H, W) float or (N, H, W, C) uint8; ids_keep: (N, L_vis) or None (all patches).

        Returns the normalized tokens (N, 1 + L_vis, D), cls first, visible patches in ``ids_keep`` order.
        With ``global_pool`` the final norm is applied after pooling instead (see forward_head).
        """
        _, grid = self.check_images(imgs)
        x = self.embed_patches(imgs, ids_keep, grid)
        for blk in self.blocks:
            x = blk(x)
        return x if self.global_pool else self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: (N, T, D) tokens -> pooled features (N, D), or logits (N, num_classes)."""
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, imgs: Tensor) -> Tensor:
        """imgs -> logits (N, num_classes), or pooled features (N, D) without a head."""
        return self.forward_head(self.forward_features(imgs))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's optimizer helpers: embeddings, each block, then norm / fc_norm / head together.

        MAE's layer-wise lr decay puts the final norm in the head's layer (timm's own ViT puts it with the last block).
        """
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=r"^blocks\.(\d+)", head=r"^norm|^fc_norm|^head")

