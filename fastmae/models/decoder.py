"""The decoder scaffolding MAE and CrossMAE share: the official parameter names, their init, the mask draw.

Both models keep MAE's names (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm``, ``decoder_pred``) so official checkpoints load with ``strict=True``; only the block type (self-
or cross-attention) and what the mask token is added to differ, and those stay in each model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastmae.layers import init_weights, sincos_2d
from fastmae.models.masks import mae_mask_keys, mask_type_problem
from fastmae.models.vit import VisionTransformer
from fastmae.reference import patchify, random_masking, unpatchify

LOSS_TYPES = ("mse", "l1")
# The decoder input's dtype under autocast: fp32 (official: bf16 tokens + the fp32 table, summed and stored in fp32),
# autocast (a low-precision copy of the table, so the decoder input is written in bf16), auto (= the residual stream's).
DECODER_INPUT_DTYPES = ("auto", "fp32", "autocast")


class MaskedDecoderViT(VisionTransformer):
    """A ViT encoder plus the decoder parts of MAE's family; subclasses call :meth:`build_decoder`, then
    :meth:`init_decoder`, in ``__init__``."""

    def build_decoder(self, block: Callable[[], nn.Module], depth: int, decoder_embed_dim: int, norm_layer,
                      *, loss_type: str, mask_type: str, norm_pix_loss: bool, mask_token_dim: int | None = None,
                      decoder_input_dtype: str = "auto") -> None:
        """Check the loss and mask type, then make the decoder's modules in the official order."""
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
        if decoder_input_dtype not in DECODER_INPUT_DTYPES:
            raise ValueError(f"decoder_input_dtype must be one of {DECODER_INPUT_DTYPES}, got {decoder_input_dtype!r}")
        # "fp32": the official numerics (fp32 table, fp32 decoder input under autocast); "autocast": the table in the
        # autocast dtype, so the decoder input is bf16 under bf16 autocast; "auto": the decoder input is the first value
        # of the decoder's residual stream, so it takes that stream's dtype.
        if decoder_input_dtype == "auto":
            decoder_input_dtype = "autocast" if self.residual_dtype == "bf16" else "fp32"
        self.decoder_input_dtype = decoder_input_dtype
        if problem := mask_type_problem(mask_type, grid=self.patch_embed.grid_size):
            raise ValueError(problem)
        self.norm_pix_loss = norm_pix_loss
        self.loss_type = loss_type
        self.mask_type = mask_type
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mask_token_dim or decoder_embed_dim))
        num_patches = self.patch_embed.num_patches
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block() for _ in range(depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)

    def init_decoder(self) -> None:
        """The official init of the decoder built by :meth:`build_decoder` (a separate call so a subclass can add
        modules first and keep the random stream, hence seeded weights, as before)."""
        with torch.no_grad():
            table = sincos_2d(self.decoder_embed_dim, self.patch_embed.grid_size, cls_token=True)
            self.decoder_pos_embed.copy_(table.unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)

    # ---- official helpers ---------------------------------------------------------------------------------

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, L, p*p*C)"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """x: (N, L, p*p*C) -> imgs: (N, C, H, W)"""
        return unpatchify(x, self.patch_size, self.in_chans, grid_size)

    def decoder_table(self, grid: tuple[int, int]) -> Tensor:
        """The fixed decoder position table (1, 1+L, D_dec) for ``grid``: the parameter itself at the model's grid."""
        if tuple(grid) == self.patch_embed.grid_size:
            return self.decoder_pos_embed
        table = sincos_2d(self.decoder_embed_dim, grid, cls_token=True).unsqueeze(0)
        return table.to(device=self.decoder_pos_embed.device, dtype=self.decoder_pos_embed.dtype)

    def decoder_pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """The decoder position table for ``grid``, in the dtype the decoder input is to have (``decoder_input_dtype``):
        under autocast with ``"autocast"`` a low-precision copy, so the fused op (K2, or CrossMAE's query gather)
        writes its (N, *, D) output in bf16 instead of fp32 (type promotion with an fp32 table)."""
        table = self.decoder_table(grid)
        dev = table.device.type
        if self.decoder_input_dtype == "autocast" and torch.is_autocast_enabled(dev):
            # Cast per call, not cached: (1+L) x D values (0.4 MB for ViT-B) against the ~100 MB of K2 output it
            # saves, and no copy can go stale when a checkpoint loads or the table is trainable.
            table = table.to(torch.get_autocast_dtype(dev))
        return table

    # ---- masking ------------------------------------------------------------------------------------------

    def plan_masking(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None) -> tuple[int, tuple[int, int], int]:
        """Check the images, ratio and noise before any compute; returns (N, grid, len_keep)."""
        N, grid = self.check_images(imgs)
        L = grid[0] * grid[1]
        if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        len_keep = int(L * (1 - mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {L}")
        if noise is not None and not isinstance(noise, Tensor):
            raise ValueError(f"noise must be a tensor of shape (N, L) = {(N, L)}, got a {type(noise).__name__}")
        if noise is not None and tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape (N, L) = {(N, L)}, got {tuple(noise.shape)}")
        return N, grid, len_keep

    def draw_mask(self, N: int, grid: tuple[int, int], len_keep: int, noise: Tensor | None, device):
        """-> ids_keep, ids_restore, mask (1 = removed), ids_shuffle of the model's mask type (MAE's random_masking)."""
        if noise is None:
            # The default generator keeps masking capturable in CUDA graphs and seeded by torch.manual_seed.
            noise = torch.rand(N, grid[0] * grid[1], device=device)
        return random_masking(mae_mask_keys(noise, grid, len_keep, self.mask_type), len_keep)
