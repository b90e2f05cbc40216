"""CrossMAE (Fu et al., "Rethinking Patch Dependence for Masked Autoencoders", TMLR 2025).

MAE's encoder unchanged (same parameter names: the encoder exports to timm and the evaluation tools
as MAE's does); a decoder of cross-attention blocks that reconstructs only a random subset of the
masked patches. One training forward:
    imgs --patchify+gather (fused K1)--> visible patches --encoder--> latent (N, 1+L_vis, D)
         --decoder_embed--> memory (N, 1+L_vis, D_dec)     keys and values of every decoder block
    ids_target (N, L_t) = a random subset of the masked ids, L_t = int(L * prediction_ratio)
         --gather_queries (fused; replaces MAE's full-grid unshuffle scatter): mask_token +
           decoder_pos_embed[1 + ids]--> queries (N, L_t, D_dec)
         --cross-attention blocks (no self-attention between queries)--> decoder_norm, decoder_pred
         --> pred (N, L_t, p*p*C) --masked loss on exactly ids_target (fused K3)--> loss

Queries are decoded independently, so the decoder's cost scales with L_t (49 of 196 at ViT-B with
prediction ratio 0.25, instead of MAE's 197 tokens), and at evaluation every masked patch can be
decoded by the same weights: ``prediction_ratio=None`` means the model's ratio in training mode and
every masked patch in eval mode (so held-out losses and reconstructions compare with MAE's).

With ``feature_fusion`` (the paper's inter-block feature maps) decoder block j reads its own mix of
the encoder's patch embeddings and block outputs (the last through the encoder's ``norm``), each mix
normalized and projected by the shared ``decoder_embed``.

``forward`` keeps MAE's contract ``(loss, pred (N, L, p*p*C), mask (N, L))`` with pred scattered to
the full grid (zeros at patches it did not predict), so visualization code works on either model;
:meth:`forward_partial` returns the compact ``pred (N, L_t, p*p*C)`` with its ``ids_target``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastmae import ops
from fastmae.layers.cross_block import CrossBlock
from fastmae.layers.feature_fusion import FeatureFusion
from fastmae.models.decoder import MaskedDecoderViT
from fastmae.models.vit import LayerNorm6


class CrossMAE(MaskedDecoderViT):
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
        prediction_ratio: float = 0.25,
        feature_fusion: bool = False,
        mask_type: str = "random",
        decoder_input_dtype: str = "auto",
        **vit_kwargs,
    ):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer, **vit_kwargs,
        )
        if not isinstance(prediction_ratio, (int, float)) or not 0.0 < prediction_ratio <= 1.0:
            raise ValueError(f"prediction_ratio must be in (0, 1], got {prediction_ratio!r}")
        self.prediction_ratio = float(prediction_ratio)
        self.build_decoder(
            lambda: CrossBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                               residual_dtype=self.residual_dtype),
            decoder_depth, decoder_embed_dim, norm_layer, loss_type=loss_type, mask_type=mask_type,
            norm_pix_loss=norm_pix_loss, decoder_input_dtype=decoder_input_dtype)
        # Inputs of the fusion: the patch embeddings and every encoder block's output.
        self.decoder_fusion = FeatureFusion(depth + 1, decoder_depth, embed_dim, norm_layer) if feature_fusion else None
        self.init_decoder()

    # ---- masking and targets --------------------------------------------------------------------------------

    def _plan(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None, prediction_ratio: float | None):
        """Check every input before any compute; returns (N, grid, len_keep, n_pred)."""
        N, grid, len_keep = self.plan_masking(imgs, mask_ratio, noise)
        L = grid[0] * grid[1]
        if prediction_ratio is None:
            prediction_ratio = self.prediction_ratio if self.training else 1.0
        if not isinstance(prediction_ratio, (int, float)) or not 0.0 < prediction_ratio <= 1.0:
            raise ValueError(f"prediction_ratio must be in (0, 1], got {prediction_ratio!r}")
        # A ratio at or above the mask ratio predicts every masked patch.
        n_pred = min(L - len_keep, int(L * prediction_ratio))
        if n_pred < 1:
            raise ValueError(f"prediction_ratio {prediction_ratio} predicts no patch out of {L}")
        return N, grid, len_keep, n_pred

    def select_targets(self, ids_masked: Tensor, n_pred: int) -> Tensor:
        """ids_masked: (N, L_mask) -> ids_target (N, n_pred): a uniformly random subset, without repeats.

        The subset is drawn from the default generator (seeded by torch.manual_seed, capturable in CUDA
        graphs); with n_pred == L_mask it is ids_masked itself and nothing is drawn.
        """
        N, n_masked = ids_masked.shape
        if n_pred == n_masked:
            return ids_masked
        pick = torch.argsort(torch.rand(N, n_masked, device=ids_masked.device), dim=1)[:, :n_pred]
        return torch.gather(ids_masked, 1, pick)

    # ---- forward --------------------------------------------------------------------------------------------

    def forward_memory(self, imgs: Tensor, ids_keep: Tensor, grid: tuple[int, int]) -> list[Tensor]:
        """Keys/values of the decoder blocks: one (N, 1+L_vis, D_dec) per block (a single shared one without fusion)."""
        x = self.embed_patches(imgs, ids_keep, grid)
        feats = [x]
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        feats[-1] = self.norm(x)
        if self.decoder_fusion is None:
            return [self.decoder_embed(feats[-1])]
        return [self.decoder_embed(f) for f in self.decoder_fusion(feats)]

    def forward_decoder(self, memory: list[Tensor], ids_target: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """memory: from forward_memory; ids_target: (N, L_t) -> pred (N, L_t, p*p*C), row j <-> patch ids_target[:, j]"""
        grid = grid or self.patch_embed.grid_size
        table = self.decoder_pos_embed_for(grid)  # bf16 under autocast with decoder_input_dtype=autocast
        x = ops.gather_queries(self.mask_token.reshape(-1).to(table.dtype), table, ids_target)
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, memory[i] if len(memory) > 1 else memory[0])
        return self.decoder_pred(self.decoder_norm(x))

    def forward_partial(
        self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None, prediction_ratio: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> loss (fp32 scalar), pred (N, L_t, p*p*C), mask (N, L) with 1 = removed, ids_target (N, L_t)."""
        N, grid, len_keep, n_pred = self._plan(imgs, mask_ratio, noise, prediction_ratio)
        ids_keep, _, mask, ids_shuffle = self.draw_mask(N, grid, len_keep, noise, imgs.device)
        ids_target = self.select_targets(ids_shuffle[:, len_keep:], n_pred)
        memory = self.forward_memory(imgs, ids_keep, grid)
        pred = self.forward_decoder(memory, ids_target, grid)
        mean, std = self._norm_args(imgs)
        loss = ops.masked_recon_loss(pred, imgs, ids_target, self.patch_size, self.norm_pix_loss, self.loss_type, mean, std)
        return loss, pred, mask, ids_target

    def forward(
        self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None, prediction_ratio: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: (N, C, H, W) normalized float, or (N, H, W, C) uint8 (normalized inside with pixel_mean/std).

        Returns loss (fp32 scalar, over the predicted patches), pred (N, L, p*p*C) with the predicted
        patches in place and zeros elsewhere, mask (N, L) with 1 = removed (MAE's: every patch the encoder
        did not see). In eval mode (prediction_ratio None) every removed patch is predicted.
        """
        loss, pred, mask, ids_target = self.forward_partial(imgs, mask_ratio, noise, prediction_ratio)
        N, L = mask.shape
        P = pred.shape[-1]
        full = pred.new_zeros(N, L, P).scatter(1, ids_target.unsqueeze(-1).expand(-1, -1, P), pred)
        return loss, full, mask


def crossmae_vit_tiny(**kw) -> CrossMAE:
    """CPU-sized, MAE-tiny's shapes: 64 px, patch 8, width 192, depth 4, decoder 128 x 2, fusion on."""
    arch = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
                decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=LayerNorm6, prediction_ratio=0.25,
                feature_fusion=True)
    return CrossMAE(**{**arch, **kw})


def crossmae_vit_base_patch16(**kw) -> CrossMAE:
    """The paper's ViT-B/16 recipe: decoder 512 x 12 (16 heads), prediction ratio 0.25, inter-block feature maps."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=12,
                decoder_num_heads=16, mlp_ratio=4, norm_layer=LayerNorm6, prediction_ratio=0.25, feature_fusion=True)
    return CrossMAE(**{**arch, **kw})


CROSSMAE_MODELS: dict[str, Callable[..., CrossMAE]] = {
    "crossmae_vit_tiny": crossmae_vit_tiny,
    "crossmae_vit_base_patch16": crossmae_vit_base_patch16,
}
