"""Encoders for evaluation from any source: a fastmae or official MAE checkpoint, an eval checkpoint, or random init.

A state dict fixes every shape but not the number of attention heads; that
comes from the checkpoint's own record (``arch`` in fastmae eval checkpoints,
the model name in a pretraining ``config`` or an official ``args``), or from
the command line.
"""

from __future__ import annotations

import math
import re

from fastmae.convert import check_arch, load_pretrained, model_state_dict, read_checkpoint
from fastmae.methods.registry import build_meta_model
from fastmae.models.vit import VisionTransformer

# The encoder of the digits demo: width 64, depth 4, patch 4 on 16 px grayscale digits.
DIGITS_ARCH = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
RANDOM = ("", "random", "none")


def read_source(source: str) -> tuple[dict | None, dict]:
    """``source``: checkpoint path, or ''/'random' -> (state dict or None, metadata dict of the checkpoint)."""
    if source.lower() in RANDOM:
        return None, {}
    ckpt = _read_dcp(source) or read_checkpoint(source)
    sd = model_state_dict(ckpt)
    wrapped = "model" in ckpt or "state_dict" in ckpt
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "state_dict", "optimizer")} if wrapped else {}
    return sd, meta


def _read_dcp(source: str) -> dict | None:
    """A ``--ckpt_format=dcp`` checkpoint (a ``checkpoint-S.dcp`` folder, or a run folder whose newest checkpoint is
    one), verified and consolidated into full tensors; None for anything else."""
    from pathlib import Path

    from fastmae.engine.checkpoint import latest_checkpoint, load_checkpoint

    path = Path(source)
    folder = path if path.name.endswith(".dcp") else latest_checkpoint(path) if path.is_dir() else None
    return load_checkpoint(folder) if folder is not None and folder.is_dir() else None


def _model_name(meta: dict) -> str | None:
    cfg = meta.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
        return cfg["model"]
    args = meta.get("args")
    name = getattr(args, "model", None)
    return name if isinstance(name, str) else None


def named_heads(name: str | None) -> tuple[int, int | None] | None:
    """(encoder heads, decoder heads or None) of a registered model name, or None if unknown.

    timm-style encoder names (``vit_base_patch16``) stand for the MAE model of the same architecture.
    """
    for candidate in (name, f"mae_{name}") if name else ():
        model = build_meta_model(candidate)
        if model is not None:
            decoder = getattr(model, "decoder_blocks", None)
            return model.blocks[0].attn.num_heads, decoder[0].attn.num_heads if decoder else None
    return None


def infer_arch(sd: dict, meta: dict) -> dict:
    """Encoder keyword arguments read from the shapes of a ViT/MAE state dict (num_heads from metadata)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"checkpoint is not a ViT/MAE encoder: missing {', '.join(missing)} "
                         f"(has {len(sd)} keys, e.g. {sorted(sd)[:5]})")
    w = sd["patch_embed.proj.weight"]
    D, C, p = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    L = sd["pos_embed"].shape[1] - 1
    g = math.isqrt(L)
    arch = dict(patch_size=p, in_chans=C, embed_dim=D, depth=depth, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)
    if g * g == L:
        arch["img_size"] = g * p
    recorded = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    heads = named_heads(_model_name(meta))
    if recorded.get("num_heads"):
        arch["num_heads"] = int(recorded["num_heads"])
    elif heads is not None:
        arch["num_heads"] = heads[0]
    if recorded.get("img_size"):
        arch["img_size"] = int(recorded["img_size"])
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if "img_size" not in arch and cfg.get("img_size"):
        arch["img_size"] = int(cfg["img_size"])
    check_arch(arch, "checkpoint")  # shapes and records of a hostile file must not reach an allocation
    return arch


def resolve_arch(sd: dict | None, meta: dict, overrides: dict) -> dict:
    """Checkpoint architecture (or the digits demo's for random init), then non-zero ``overrides`` on top."""
    arch = dict(DIGITS_ARCH) if sd is None else infer_arch(sd, meta)
    arch.update({k: v for k, v in overrides.items() if k in ARCH_KEYS and v})
    if not arch.get("num_heads"):
        raise ValueError("the checkpoint does not record the number of attention heads: pass --num_heads=H")
    if "img_size" not in arch:
        raise ValueError("the checkpoint's position table is not square: pass --img_size=S")
    if arch["embed_dim"] % arch["num_heads"]:
        raise ValueError(f"embed_dim {arch['embed_dim']} is not divisible by num_heads {arch['num_heads']}")
    return {k: arch[k] for k in ARCH_KEYS}


def build_encoder(arch: dict, sd: dict | None, *, num_classes: int = 0, global_pool: bool = False,
                  drop_path_rate: float = 0.0, learn_pos_embed: bool = False, pixel_mean=None,
                  pixel_std=None) -> VisionTransformer:
    """A ViT with ``arch``, loaded from ``sd`` (decoder and any old head dropped) or randomly initialized.

    A mismatching checkpoint raises ValueError listing the keys and shapes that differ.
    """
    C = arch["in_chans"]
    kw = dict(pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std)) if pixel_mean is not None else (
        {} if C == 3 else dict(pixel_mean=(0.5,) * C, pixel_std=(0.5,) * C))
    model = VisionTransformer(**arch, num_classes=num_classes, global_pool=global_pool,
                              drop_path_rate=drop_path_rate, learn_pos_embed=learn_pos_embed, **kw)
    if sd is not None:
        sd = _as_encoder(sd, global_pool)
        load_pretrained(model, sd, strict=True, allow_missing=("head.", "fc_norm.", "norm."), drop=("head.",))
    return model


def _as_encoder(sd: dict, global_pool: bool) -> dict:
    """Keep the final norm that fits the pooling: the pretrained ``norm`` for cls pooling, none for global pool."""
    drop = ("norm.",) if global_pool else ("fc_norm.",)
    return {k: v for k, v in sd.items() if not k.startswith(drop)}

