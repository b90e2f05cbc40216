"""SimMIM (Xie et al. 2022) on the fastmae ViT: full-token encoder, mask token, linear head, L1 loss.

One training forward:
    noise (N, cells) --argsort--> masked cells --upsample--> mask (N, L), ids_masked (N, L_mask)
    imgs --patchify (fused K1, all ids)--> patches (N, L, p*p*C) --patch_embed--> (N, L, D)
         masked rows replaced by ``mask_token`` *before* positions are added, cls first
         --encoder (all L+1 tokens)--> norm --decoder_pred (Linear D -> p*p*C)--> pred (N, L, p*p*C)
         --L1 on masked patches of the normalized image (fused K3, l1 mode)--> loss

The head is SimMIM's ``1x1 conv + PixelShuffle(p)`` written as a Linear on tokens: the conv's
output channel ``c*p*p + i*p + j`` is this Linear's row ``(i*p + j)*C + c`` (pixels in (p, q, c)
order, as everywhere in fastmae).

The loss is SimMIM's: L1 over the masked pixels x channels of the input (normalized) image, divided
by their count. SimMIM adds 1e-5 to the denominator; with a static, non-zero masked count it is
dropped (a relative difference of 1e-5 / count). ``mask_ratio`` is honoured as passed; SimMIM's
0.6 is the default here and in the ``simmim_*`` presets.

Position embeddings are MAE's fixed 2-D sin-cos table (SimMIM's ViT-B used relative position bias);
parameter names follow the official MAE encoder (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.*``, ``norm``) plus ``mask_token`` (1, 1, D) and ``decoder_pred``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastmae import ops
from fastmae.layers import init_weights
from fastmae.methods.registry import MethodConfig, MethodSpec, image_model_kwargs, register_method
from fastmae.models.masks import block_mask, block_mask_geometry
from fastmae.models.vit import LayerNorm6, VisionTransformer
from fastmae.reference import unpatchify


class SimMIMViT(VisionTransformer):
    def __init__(self, mask_patch_size: int = 32, **vit_kwargs):
        super().__init__(**vit_kwargs)
        self.mask_patch_size = mask_patch_size
        # Fail at construction for a cell that does not tile the training grid (the forward re-checks per batch).
        block_mask_geometry(self.patch_embed.img_size, mask_patch_size, self.patch_size, 0.0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.decoder_pred = nn.Linear(self.embed_dim, self.patch_size**2 * self.in_chans)
        with torch.no_grad():
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_weights(self.decoder_pred)

    def unpatchify(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """x: (N, L, p*p*C) -> imgs: (N, C, H, W)"""
        return unpatchify(x, self.patch_size, self.in_chans, grid_size)

    def _plan(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None):
        N, grid = self.check_images(imgs)
        p = self.patch_size
        cells, scale, n_masked = block_mask_geometry((grid[0] * p, grid[1] * p), self.mask_patch_size, p, mask_ratio)
        n_cells = cells[0] * cells[1]
        if noise is not None and tuple(noise.shape) != (N, n_cells):
            raise ValueError(
                f"noise must have shape (N, mask cells) = {(N, n_cells)} for {self.mask_patch_size}-px cells, "
                f"got {tuple(noise.shape)}"
            )
        return N, grid, cells, scale, n_masked

    def generate_mask(self, imgs: Tensor, mask_ratio: float = 0.6, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> mask (N, L) with 1 = masked, ids_masked (N, L_mask)."""
        N, _, cells, scale, n_masked = self._plan(imgs, mask_ratio, noise)
        if noise is None:
            # The default generator keeps the mask seeded by torch.manual_seed and capturable in CUDA graphs.
            noise = torch.rand(N, cells[0] * cells[1], device=imgs.device)
        return block_mask(noise, cells, scale, n_masked)

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """imgs: (N, C, H, W) float or (N, H, W, C) uint8; mask: (N, L) 1 = masked -> tokens (N, 1+L, D), normalized."""
        N, grid = self.check_images(imgs)
        L = grid[0] * grid[1]
        if tuple(mask.shape) != (N, L):
            raise ValueError(f"mask must have shape (N, L) = {(N, L)}, got {tuple(mask.shape)}")
        mean, std = self._norm_args(imgs)
        ids_all = torch.arange(L, device=imgs.device).expand(N, L)
        patches = ops.patchify_gather(imgs, ids_all, self.patch_size, mean, std, self._compute_dtype(imgs))
        x = self.patch_embed(patches)
        x = torch.where(mask.unsqueeze(-1) > 0, self.mask_token.to(x.dtype), x)
        pos = self.pos_embed_for(grid)
        x = x + pos[:, 1:, :]
        cls = (self.cls_token + pos[:, :1, :]).expand(N, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs: Tensor, mask_ratio: float = 0.6, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: (N, C, H, W) normalized float, or (N, H, W, C) uint8; noise: (N, mask cells) or None.

        Returns loss (fp32 scalar), pred (N, L, p*p*C) for every patch, mask (N, L) with 1 = masked.
        """
        mask, ids_masked = self.generate_mask(imgs, mask_ratio, noise)
        latent = self.forward_encoder(imgs, mask)
        pred = self.decoder_pred(latent[:, 1:, :])
        if ids_masked.shape[1] == 0:
            return pred.sum() * 0.0, pred, mask
        mean, std = self._norm_args(imgs)
        loss = ops.masked_recon_loss(pred, imgs, ids_masked, self.patch_size, False, "l1", mean, std)
        return loss, pred, mask


def simmim_vit_tiny(**kw) -> SimMIMViT:
    """CPU-sized: 64 px, patch 8, 16-px mask cells, width 192, depth 4."""
    arch = dict(img_size=64, patch_size=8, mask_patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4,
                norm_layer=LayerNorm6)
    return SimMIMViT(**{**arch, **kw})


def simmim_vit_base_patch16(**kw) -> SimMIMViT:
    """SimMIM's ViT-B/16 recipe: 224 px, 32-px mask cells, drop path 0.1."""
    arch = dict(img_size=224, patch_size=16, mask_patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                norm_layer=LayerNorm6, drop_path_rate=0.1)
    return SimMIMViT(**{**arch, **kw})


SIMMIM_MODELS: dict[str, Callable[..., SimMIMViT]] = {
    "simmim_vit_tiny": simmim_vit_tiny,
    "simmim_vit_base_patch16": simmim_vit_base_patch16,
}


# SimMIM paper (ViT-B/16, 800 epochs): AdamW, lr 1e-4 x batch/512 (= blr 0.5e-4 per 256), warmup 10,
# wd 0.05, drop path 0.1 (in the model factory), clip 5.0, betas (0.9, 0.999), mask 0.6 of 32-px cells.
PRESETS: dict[str, dict] = {
    "simmim_vit_base_patch16": dict(
        method="simmim", model="simmim_vit_base_patch16", img_size=224, patch_size=16, mask_ratio=0.6,
        norm_pix_loss=False, epochs=800, warmup_epochs=10.0, batch_size=128, accum_iter=1, blr=0.5e-4,
        weight_decay=0.05, beta1=0.9, beta2=0.999, clip_grad=5.0, loader="dali", num_workers=10, log_every=50,
        ckpt_every=1000, compile=True,
    ),
    # CPU-sized: the embedded image demo on 2 cores. SimMIM's encoder sees every token (4x MAE's at 0.75),
    # so half of MAE-tiny's epochs take about as long; the lr is raised for a run this short.
    "simmim_tiny": dict(
        method="simmim", model="simmim_vit_tiny", img_size=64, patch_size=8, mask_ratio=0.6, norm_pix_loss=False,
        epochs=15, warmup_epochs=2.0, batch_size=32, blr=2e-3, beta1=0.9, beta2=0.999, clip_grad=5.0, log_every=10,
        ckpt_every=100,
    ),
}


@dataclass
class SimMIMConfig(MethodConfig):
    mask_patch_size: int = field(default=0, metadata={"help": "SimMIM mask cell in pixels (a multiple of patch_size); "
                                                               "0 = the model's"})

    def validate(self, cfg) -> None:
        if self.mask_patch_size < 0:
            raise ValueError(f"mask_patch_size must be >= 0, got {self.mask_patch_size}")


def model_kwargs(cfg) -> dict:
    """``mask_patch_size`` 0 keeps the model's cell size."""
    kw = {**image_model_kwargs(cfg), "residual_dtype": cfg.step.residual_dtype}
    if cfg.method.mask_patch_size:
        kw["mask_patch_size"] = cfg.method.mask_patch_size
    return kw


def noise_shape(model: SimMIMViT, batch: Tensor) -> tuple[int, int]:
    """One noise value per mask cell: (N, cells) for float (N, C, H, W) or uint8 (N, H, W, C) batches."""
    H, W = (batch.shape[1], batch.shape[2]) if batch.dtype == torch.uint8 else (batch.shape[2], batch.shape[3])
    return batch.shape[0], (H // model.mask_patch_size) * (W // model.mask_patch_size)


register_method(MethodSpec(
    name="simmim", models=SIMMIM_MODELS, model_kwargs=model_kwargs, noise_shape=noise_shape, presets=PRESETS,
    default_preset="simmim_tiny", size_siblings_of=("mae_",), config=SimMIMConfig,
))
