"""MAE (He et al. 2021) as a registered method: the models of ``fastmae.models``, the official recipes as presets."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from fastmae.engine.flops import mae_forward_flops
from fastmae.methods.registry import MethodSpec, image_model_kwargs, register_method
from fastmae.models import MODELS

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


def model_kwargs(cfg) -> dict:
    kw = {**image_model_kwargs(cfg), "norm_pix_loss": cfg.norm_pix_loss, "residual_dtype": cfg.residual_dtype}
    # The MAE paper's ablations (fields of PretrainConfig; 0 = the model's decoder shape).
    for key in ("mask_type", "loss_on", "encoder_mask_tokens", "decoder_input_dtype"):
        kw[key] = getattr(cfg, key)
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    return kw


def noise_shape(model: nn.Module, batch: Tensor) -> tuple[int, int]:
    """One noise value per patch: (N, L)."""
    return batch.shape[0], model.patch_embed.num_patches


def flops_per_image(model: nn.Module, cfg) -> float:
    """Training FLOPs per image: forward + backward = 3 forwards."""
    return 3 * mae_forward_flops(model, cfg.img_size, cfg.mask_ratio)


def visualize(model: nn.Module, batch: Tensor, mask_ratio: float, noise: Tensor, path: Path | None, mean, std) -> Path | None:
    """original | masked | reconstruction | pasted, one row per image."""
    from fastmae.viz import reconstruct, save_grid

    panels = reconstruct(model, batch.float(), mask_ratio, noise)
    return save_grid(panels, path, mean, std) if path is not None else None


register_method(MethodSpec(
    name="mae", models=MODELS, model_kwargs=model_kwargs, noise_shape=noise_shape, presets=PRESETS,
    default_preset="tiny", flops_per_image=flops_per_image, visualize=visualize,
))
