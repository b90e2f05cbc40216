"""The masked-image-modeling family on one stack: MAE, SimMIM and VideoMAE.

:func:`build_method_model` turns a run config into the model for its ``method``; every model's
``forward(imgs, mask_ratio=..., noise=None)`` returns ``(loss, pred, mask)`` so the training step
is the same for all of them. :func:`build_method_loader` gives the clip loader for video methods
(``None`` for image methods). :data:`METHOD_PRESETS` holds the family's run presets (field
overrides of ``PretrainConfig``).

Config fields read here beyond ``PretrainConfig``'s (with ``getattr`` defaults):
``mask_patch_size`` (SimMIM cell, 0 = the model's), ``num_frames`` (16), ``frame_stride`` (4),
``tubelet_size`` (0 = the model's), ``video_target_norm`` ("" = from ``norm_pix_loss``:
"tubelet" if true, else "none"; or "channel", "tubelet", "none").
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["METHOD_PRESETS", "build_method_model", "build_method_loader", "family_models", "resolve_model_name"]

# SimMIM paper (ViT-B/16, 800 epochs): AdamW, lr 1e-4 x batch/512 (= blr 0.5e-4 per 256), warmup 10,
# wd 0.05, drop path 0.1 (in the model factory), clip 5.0, betas (0.9, 0.999), mask 0.6 of 32-px cells.
# VideoMAE paper (ViT-B, K400, 800 epochs): AdamW, blr 1.5e-4 per 256, warmup 40, wd 0.05, betas
# (0.9, 0.95), 16 frames stride 4, tube mask 0.9, batch 32 per GPU x 64 GPUs.
METHOD_PRESETS: dict[str, dict] = {
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
    "videomae_vit_base": dict(
        method="videomae", model="videomae_vit_base_patch16", img_size=224, patch_size=16, mask_ratio=0.9,
        norm_pix_loss=True, epochs=800, warmup_epochs=40.0, batch_size=32, accum_iter=1, blr=1.5e-4,
        weight_decay=0.05, beta1=0.9, beta2=0.95, loader="dali", num_workers=10, log_every=50, ckpt_every=1000,
        compile=True,
    ),
    # CPU-sized: the embedded clip demo (24 VP9 clips of 64 frames, 16 x stride 4 sampled) in a few minutes.
    "videomae_tiny": dict(
        method="videomae", model="videomae_vit_tiny", img_size=64, patch_size=8, mask_ratio=0.9, norm_pix_loss=True,
        epochs=40, warmup_epochs=4.0, batch_size=8, blr=1e-2, num_workers=0, log_every=6, ckpt_every=60,
    ),
}


def family_models() -> dict[str, dict[str, Callable]]:
    """{method: {model name: factory}}."""
    from fastmae.methods.simmim import SIMMIM_MODELS
    from fastmae.methods.videomae import VIDEOMAE_MODELS
    from fastmae.models import MODELS

    return {"mae": dict(MODELS), "simmim": dict(SIMMIM_MODELS), "videomae": dict(VIDEOMAE_MODELS)}


def resolve_model_name(method: str, name: str) -> str:
    """The model for ``method``: ``name`` itself, or its same-size sibling when ``name`` is an MAE model
    (so ``--method=simmim`` on the default MAE preset picks ``simmim_vit_tiny``)."""
    registry = family_models()
    if method not in registry:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(registry)}")
    models = registry[method]
    if name in models:
        return name
    if name.startswith("mae_") and f"{method}_{name[4:]}" in models:
        return f"{method}_{name[4:]}"
    raise ValueError(f"model {name!r} is not a {method} model; choose one of {sorted(models)}")


def build_method_model(cfg):
    method = cfg.method
    name = resolve_model_name(method, cfg.model)
    factory = family_models()[method][name]
    kw: dict = dict(img_size=cfg.img_size)
    if cfg.patch_size:
        kw["patch_size"] = cfg.patch_size
    if method == "mae":
        kw["norm_pix_loss"] = cfg.norm_pix_loss
    elif method == "simmim":
        if getattr(cfg, "mask_patch_size", 0):
            kw["mask_patch_size"] = cfg.mask_patch_size
    elif method == "videomae":
        kw["num_frames"] = getattr(cfg, "num_frames", 16)
        if getattr(cfg, "tubelet_size", 0):
            kw["tubelet_size"] = cfg.tubelet_size
        kw["target_norm"] = getattr(cfg, "video_target_norm", "") or ("tubelet" if cfg.norm_pix_loss else "none")
    return factory(**kw)


def build_method_loader(cfg, info, split: str, output: str):
    """A clip loader for video methods, or None to use the image loaders.

    output: "float" -> clips (N, C, T, H, W) normalized float32; "uint8" -> (N, T, H, W, C).
    """
    if cfg.method != "videomae":
        return None
    from fastmae.data import build_video_loader

    num_frames, tubelet = getattr(cfg, "num_frames", 16), getattr(cfg, "tubelet_size", 0) or 2
    if num_frames % tubelet:
        raise ValueError(f"num_frames {num_frames} is not divisible by the tubelet size {tubelet}")
    train = split == "train"
    return build_video_loader(
        cfg.data, split=split, batch_size=cfg.batch_size, img_size=cfg.img_size, num_frames=num_frames,
        frame_stride=getattr(cfg, "frame_stride", 4), loader=cfg.loader, output=output, train=train,
        num_workers=cfg.num_workers, seed=cfg.seed, rank=info.rank if train else 0,
        world_size=info.world_size if train else 1, device=str(info.device), drop_last=train,
    )
