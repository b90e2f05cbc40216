"""MAE (He et al. 2021) as a registered method: the models of ``fastmae.models``, the official recipes as presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from fastmae.engine.flops import mae_forward_flops
from fastmae.layers import attention
from fastmae.methods.registry import MethodConfig, MethodSpec, image_model_kwargs, register_method
from fastmae.models import MODELS
from fastmae.models.masks import mask_type_problem

# Official recipes (MAE paper, appendix A.1): 800 epochs, 40 warmup, effective batch 4096 = batch * accum * world.
OFFICIAL_RECIPE = dict(img_size=224, epochs=800, warmup_epochs=40.0, batch_size=64, accum_iter=8, eff_batch=4096, blr=1.5e-4,
                       weight_decay=0.05, norm_pix_loss=True, mask_ratio=0.75, loader="dali", num_workers=10,
                       log_every=50, ckpt_every=1000, compile=True, precision="auto")

PRESETS: dict[str, dict] = {
    # CPU-sized: the embedded demo in a few minutes on 2 cores.
    "tiny": dict(model="mae_vit_tiny", img_size=64, patch_size=8, epochs=100, warmup_epochs=5.0, batch_size=32,
                 blr=1.5e-3, log_every=10, ckpt_every=100),
    "small": dict(model="mae_vit_small_patch16", img_size=96, patch_size=16, epochs=50, warmup_epochs=5.0,
                  batch_size=32, blr=1.5e-3, log_every=10, ckpt_every=200),
    "base": dict(model="mae_vit_base_patch16", **OFFICIAL_RECIPE),
    "large": dict(model="mae_vit_large_patch16", **OFFICIAL_RECIPE),
    "huge": dict(model="mae_vit_huge_patch14", **{**OFFICIAL_RECIPE, "batch_size": 32, "accum_iter": 16, "fsdp": True}),
}


def _help(text: str, **meta) -> dict:
    return {"help": text, **meta}


@dataclass
class MaskDecoderConfig(MethodConfig):
    """The keys MAE and CrossMAE share: the MAE paper's mask pattern and the decoder's shape (0 = the model's)."""

    mask_type: str = field(default="random", metadata=_help("random | block (BEiT-style blocks, exact count) | grid "
                                                            "(keep 1 of every 2x2; mask_ratio 0.75): the MAE paper's Fig. 6"))
    decoder_embed_dim: int = field(default=0, metadata=_help("decoder width; 0 = the model's"))
    decoder_depth: int = field(default=0, metadata=_help("decoder blocks; 0 = the model's"))
    decoder_num_heads: int = field(default=0, metadata=_help("decoder attention heads; 0 = the model's"))

    def validate(self, cfg) -> None:
        problem = mask_type_problem(self.mask_type, cfg.model.mask_ratio)  # the mask table owns its constraints
        if problem:
            raise ValueError(problem)
        if min(self.decoder_embed_dim, self.decoder_depth, self.decoder_num_heads) < 0:
            raise ValueError("decoder_embed_dim, decoder_depth and decoder_num_heads must be >= 0 (0 = the model's)")
        if self.decoder_embed_dim and self.decoder_num_heads:
            attention.check_heads(self.decoder_embed_dim, self.decoder_num_heads, ("decoder_embed_dim", "decoder_num_heads"))

    def decoder_kwargs(self) -> dict:
        """The decoder shape keys that are set (0 = the model's)."""
        return {k: getattr(self, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads") if getattr(self, k)}


@dataclass
class MAEConfig(MaskDecoderConfig):
    """MAE's keys: the shared mask/decoder keys plus the paper's two ablations of what the encoder sees and the loss."""

    loss_on: str = field(default="masked", metadata=_help("masked (MAE) | all (loss on visible patches too: the paper's "
                                                          "'w/o masked only')"))
    encoder_mask_tokens: bool = field(default=False, metadata=_help("the encoder sees every patch, masked ones as a mask "
                                                                     "token (the paper's 'encoder w/ [M]', ~3.3x encoder FLOPs)"))

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if self.loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be masked or all, got {self.loss_on!r}")


def model_kwargs(cfg) -> dict:
    m = cfg.method
    kw = {**image_model_kwargs(cfg), "norm_pix_loss": cfg.model.norm_pix_loss, "residual_dtype": cfg.step.residual_dtype,
          "decoder_input_dtype": cfg.step.decoder_input_dtype}
    # The MAE paper's ablations (MAEConfig).
    kw.update(mask_type=m.mask_type, loss_on=m.loss_on, encoder_mask_tokens=m.encoder_mask_tokens, **m.decoder_kwargs())
    return kw


def noise_shape(model: nn.Module, batch: Tensor) -> tuple[int, int]:
    """One noise value per patch: (N, L)."""
    return batch.shape[0], model.patch_embed.num_patches


def flops_per_image(model: nn.Module, cfg) -> float:
    """Training FLOPs per image: forward + backward = 3 forwards."""
    return 3 * mae_forward_flops(model, cfg.data.img_size, cfg.model.mask_ratio)


def visualize(model: nn.Module, batch: Tensor, mask_ratio: float, noise: Tensor, path: Path | None, mean, std) -> Path | None:
    """original | masked | reconstruction | pasted, one row per image."""
    from fastmae.viz import reconstruct, save_grid

    panels = reconstruct(model, batch.float(), mask_ratio, noise)
    return save_grid(panels, path, mean, std) if path is not None else None


register_method(MethodSpec(
    name="mae", models=MODELS, model_kwargs=model_kwargs, noise_shape=noise_shape, presets=PRESETS,
    default_preset="tiny", flops_per_image=flops_per_image, visualize=visualize, config=MAEConfig,
))
