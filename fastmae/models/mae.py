"""Masked Autoencoder with a ViT backbone (He et al. 2021), state-dict compatible with the official code.

One training forward:
    imgs --patchify+gather (fused)--> visible patches (N, L_vis, p*p*C)
         --encoder--> latent (N, 1+L_vis, D)
         --decoder_embed, unshuffle scatter + mask token + positions (fused)--> (N, 1+L, D_dec)
         --decoder--> pred (N, L, p*p*C)
         --masked loss (fused, target built from imgs)--> loss

The MAE paper's ablations are constructor switches (each keeps every shape static):
- ``mask_type``: ``random`` (MAE), ``block`` (BEiT-style blocks) or ``grid`` (keep one of every 2x2), the
  paper's Fig. 6; see :func:`fastmae.models.masks.mae_mask_keys` for how the counts stay exact;
- ``loss_on``: ``masked`` (MAE) or ``all`` (the loss on every patch, the paper's "w/o masked only");
- ``decoder_input_dtype``: ``fp32`` (official) or ``autocast`` (the decoder input, K2's output, in the autocast
  dtype: half of K2's traffic); ``auto`` follows ``residual_dtype``. The checkpoint keeps the fp32 table either way;
- ``encoder_mask_tokens``: the encoder embeds every patch and replaces the masked ones by ``mask_token``
  (1, 1, D) before adding positions (the paper's "encoder w/ [M]", ~3.3x the encoder's FLOPs); the
  decoder then reads the encoder's full sequence plus its positions and has no mask token of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastmae import ops
from fastmae.layers import Block
from fastmae.models.decoder import MaskedDecoderViT
from fastmae.models.vit import LayerNorm6
from fastmae.reference import random_masking


class MaskedAutoencoderViT(MaskedDecoderViT):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        loss_type: str = "mse",
        mask_type: str = "random",
        loss_on: str = "masked",
        encoder_mask_tokens: bool = False,
        decoder_input_dtype: str = "auto",
        **vit_kwargs,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=norm_layer,
            **vit_kwargs,
        )
        if loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {loss_on!r}")
        self.loss_on = loss_on
        self.encoder_mask_tokens = encoder_mask_tokens
        self.build_decoder(
            lambda: Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                          residual_dtype=self.residual_dtype),
            decoder_depth, decoder_embed_dim, norm_layer, loss_type=loss_type, mask_type=mask_type,
            norm_pix_loss=norm_pix_loss, mask_token_dim=embed_dim if encoder_mask_tokens else None,
            decoder_input_dtype=decoder_input_dtype)
        self.init_decoder()

    # ---- official helpers ---------------------------------------------------------------------------------

    def random_masking(self, noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """noise: (N, L) -> ids_keep (N, len_keep), ids_restore (N, L), mask (N, L; 1 = removed), ids_shuffle (N, L)"""
        return random_masking(noise, len_keep)

    # ---- forward ------------------------------------------------------------------------------------------

    def _masking(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None):
        N, grid, len_keep = self.plan_masking(imgs, mask_ratio, noise)
        ids_keep, ids_restore, mask, ids_shuffle = self.draw_mask(N, grid, len_keep, noise, imgs.device)
        return grid, len_keep, ids_keep, ids_restore, mask, ids_shuffle

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs -> latent (N, 1+L_vis, D), mask (N, L), ids_restore (N, L), as in the official code."""
        _, _, ids_keep, ids_restore, mask, _ = self._masking(imgs, mask_ratio, noise)
        return self.forward_features(imgs, ids_keep), mask, ids_restore

    def forward_decoder(self, x: Tensor, ids_restore: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """x: (N, 1+L_vis, D), ids_restore: (N, L) -> pred (N, L, p*p*C)"""
        grid = grid or self.patch_embed.grid_size
        x = self.decoder_embed(x)
        x = ops.unshuffle_scatter(x, self.mask_token.reshape(-1), ids_restore, self.decoder_pos_embed_for(grid))
        return self._decode(x)

    def _decode(self, x: Tensor) -> Tensor:
        """x: (N, 1+L, D_dec) decoder input -> pred (N, L, p*p*C)"""
        for blk in self.decoder_blocks:
            x = blk(x)
        # Only patch tokens are predicted: the cls row is dropped before the last norm and projection.
        return self.decoder_pred(self.decoder_norm(x[:, 1:, :]))

    def forward_encoder_with_mask_tokens(self, imgs: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """The "encoder w/ [M]" ablation. mask: (N, L) 1 = removed -> latent (N, 1+L, D) in patch order, normalized."""
        x = self.embed_patches(imgs, None, grid)
        pos = self.pos_embed_for(grid)[:, 1:, :]
        tokens = torch.where(mask.unsqueeze(-1) > 0, (self.mask_token + pos).to(x.dtype), x[:, 1:, :])
        x = torch.cat([x[:, :1, :], tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Official signature. imgs, pred (N, L, P), mask (N, L) 1 = removed -> scalar loss."""
        N, grid = self.check_images(imgs)
        L, P = grid[0] * grid[1], self.patch_size**2 * self.in_chans
        for name, t, shape in (("pred", pred, (N, L, P)), ("mask", mask, (N, L))):
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape {shape} for these images, got {got}")
        n_masked = L - int(round(L * (1 - mask[0].mean().item())))  # host sync: a convenience API, not the training path
        ids_masked = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :n_masked]
        return self._loss(imgs, pred, ids_masked)

    def _loss(self, imgs: Tensor, pred: Tensor, ids_masked: Tensor) -> Tensor:
        if ids_masked.shape[1] == 0:
            # Nothing to reconstruct: a zero that keeps pred in the graph (the official code gives 0/0).
            return pred.sum() * 0.0
        mean, std = self._norm_args(imgs)
        return ops.masked_recon_loss(
            pred, imgs, ids_masked, self.patch_size, self.norm_pix_loss, self.loss_type, mean, std
        )

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: (N, C, H, W) normalized float, or (N, H, W, C) uint8 (normalized inside with pixel_mean/std).

        Returns loss (fp32 scalar), pred (N, L, p*p*C), mask (N, L) with 1 = removed.
        """
        grid, len_keep, ids_keep, ids_restore, mask, ids_shuffle = self._masking(imgs, mask_ratio, noise)
        if self.encoder_mask_tokens:
            latent = self.forward_encoder_with_mask_tokens(imgs, mask, grid)
            pred = self._decode(self.decoder_embed(latent) + self.decoder_pos_embed_for(grid))
        else:
            latent = self.forward_features(imgs, ids_keep)
            pred = self.forward_decoder(latent, ids_restore, grid)
        if self.loss_on == "all":
            N, L = mask.shape
            ids_loss = torch.arange(L, device=mask.device).expand(N, L)
        else:
            ids_loss = ids_shuffle[:, len_keep:]
        loss = self._loss(imgs, pred, ids_loss)
        return loss, pred, mask


MAE = MaskedAutoencoderViT

_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=LayerNorm6)


def _make(arch: dict, kw: dict) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**arch, **kw})


def mae_vit_tiny(**kw) -> MaskedAutoencoderViT:
    """CPU-sized: width 192, depth 4, decoder 128 x 2."""
    arch = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
                decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=LayerNorm6)
    return _make(arch, kw)


def mae_vit_small_patch16(**kw) -> MaskedAutoencoderViT:
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256,
                decoder_depth=4, decoder_num_heads=8, mlp_ratio=4, norm_layer=LayerNorm6)
    return _make(arch, kw)


def mae_vit_base_patch16(**kw) -> MaskedAutoencoderViT:
    return _make(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC), kw)


def mae_vit_large_patch16(**kw) -> MaskedAutoencoderViT:
    return _make(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC), kw)


def mae_vit_huge_patch14(**kw) -> MaskedAutoencoderViT:
    return _make(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC), kw)


MODELS: dict[str, Callable[..., MaskedAutoencoderViT]] = {
    "mae_vit_tiny": mae_vit_tiny,
    "mae_vit_small_patch16": mae_vit_small_patch16,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}


def create_model(name: str, **kw) -> MaskedAutoencoderViT:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kw)
