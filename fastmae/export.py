"""``fastmae export``: a checkpoint as a ``transformers`` folder or a timm model folder.

``--format=hf`` writes a ``save_pretrained`` folder: ``ViTMAEForPreTraining`` when the checkpoint has a
decoder (``ViTMAEModel`` loads the encoder from the same folder), ``ViTMAEModel`` for encoder-only files,
plus a ``ViTImageProcessor`` with the normalization the model was trained with.

``--format=timm`` writes ``model.safetensors`` + ``config.json`` (timm's own hub layout). Both of these load it:
    timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"), **model_args)
with ``NAME`` and ``model_args`` printed by the export (and stored in ``config.json``); any ``num_classes``
gets a fresh head. Nothing is downloaded: both libraries read the folder offline.

``--format=pth`` writes ``checkpoint.pth`` in the official MAE layout (``{'model': state dict}`` plus the run's
config, step and epoch), one file every reader of official weights takes.

A ``--ckpt_format=dcp`` checkpoint (a ``checkpoint-S.dcp`` folder, or a run folder whose newest checkpoint is one)
is verified against its manifest and consolidated: FSDP's shards become full tensors before any format is written.

Examples:
    fastmae export --ckpt=runs/mae-tiny --out=exports/mae-tiny-hf --format=hf
    fastmae export --ckpt=mae_pretrain_vit_base.pth --out=export/timm --format=timm
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastmae.eval.config import arch_key
from fastmae.flags import key, run_cli

FORMATS = ("hf", "timm", "pth")
# (embed_dim, depth) -> timm family name; other shapes use vit_base's factory with every argument given.
_TIMM_FAMILIES = {(192, 12): "vit_tiny", (384, 12): "vit_small", (768, 12): "vit_base", (1024, 24): "vit_large",
                  (1280, 32): "vit_huge"}


@dataclass
class ExportConfig:
    preset: str = key("default", "named set of defaults; the values below are this preset's")
    ckpt: str = key("", "checkpoint file (fastmae or official MAE)")
    output_dir: str = key("", "folder to write the model into (--out)")
    format: str = key("hf", "hf (transformers ViTMAE folder) | timm (timm model folder)")
    num_heads: int = arch_key("num_heads")
    decoder_num_heads: int = arch_key("decoder_num_heads")

    def validate(self) -> None:
        if not self.ckpt:
            raise ValueError("--ckpt is required: a fastmae or official MAE checkpoint")
        if not self.output_dir:
            raise ValueError("--out is required: the folder to write")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")


def _normalization(meta: dict, in_chans: int) -> tuple[list[float], list[float]]:
    from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD

    default = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    return list(meta.get("pixel_mean") or default[0]), list(meta.get("pixel_std") or default[1])


def _mask_ratio(meta: dict) -> float:
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    args = meta.get("args")
    return float(cfg.get("mask_ratio") or getattr(args, "mask_ratio", 0.75))


def export_hf(sd: dict, meta: dict, cfg: ExportConfig) -> dict:
    """Write a ``save_pretrained`` folder; returns what it wrote."""
    import transformers

    from fastmae.convert import hf_config_kwargs, to_hf_vitmae
    from fastmae.eval.models import build_encoder, resolve_arch

    full = "decoder_embed.weight" in sd
    if full:
        from fastmae.eval.visualize import VisualizeConfig, build_mae

        model = build_mae(sd, meta, VisualizeConfig(ckpt=cfg.ckpt, num_heads=cfg.num_heads,
                                                    decoder_num_heads=cfg.decoder_num_heads))
    else:
        model = build_encoder(resolve_arch(sd, meta, {"num_heads": cfg.num_heads}), sd)
    hf_cfg = transformers.ViTMAEConfig(**hf_config_kwargs(model), mask_ratio=_mask_ratio(meta))
    hf_sd = to_hf_vitmae(model.state_dict())
    if full:
        hf = transformers.ViTMAEForPreTraining(hf_cfg)
    else:
        hf = transformers.ViTMAEModel(hf_cfg)
        hf_sd = {k.removeprefix("vit."): v for k, v in hf_sd.items()}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not map onto {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(cfg.output_dir)
    hf.save_pretrained(out)
    mean, std = _normalization(meta, model.in_chans)
    size = model.patch_embed.img_size
    processor = transformers.ViTImageProcessor(image_mean=mean, image_std=std, size={"height": size[0], "width": size[1]})
    processor.save_pretrained(out)
    return {"format": "hf", "class": type(hf).__name__, "dir": str(out)}


def timm_name_and_args(arch: dict) -> tuple[str, dict]:
    """timm architecture name and the ``create_model`` keyword arguments that rebuild ``arch`` (a fastmae encoder)."""
    family = _TIMM_FAMILIES.get((arch["embed_dim"], arch["depth"]), "vit_base")
    name = f"{family}_patch{arch['patch_size']}_{arch['img_size']}"
    import timm

    if name not in timm.list_models():
        name = "vit_base_patch16_224"
    model_args = dict(img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"],
                      embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
                      mlp_ratio=arch["mlp_ratio"], global_pool="token", class_token=True)
    return name, model_args


def export_timm(sd: dict, meta: dict, cfg: ExportConfig) -> dict:
    """Write timm's folder layout (``model.safetensors`` + ``config.json``); returns what it wrote."""
    import timm

    from fastmae.convert import encoder_state_dict
    from fastmae.eval.models import resolve_arch

    arch = resolve_arch(sd, meta, {"num_heads": cfg.num_heads})
    name, model_args = timm_name_and_args(arch)
    model = timm.create_model(name, pretrained=False, num_classes=0, **model_args)
    enc = {k: v for k, v in encoder_state_dict(sd).items() if not k.startswith(("head.", "fc_norm."))}
    problems = model.load_state_dict(enc, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise ValueError(f"checkpoint does not fit timm's {name}: missing {problems.missing_keys[:5]}, "
                         f"unexpected {problems.unexpected_keys[:5]}")
    mean, std = _normalization(meta, arch["in_chans"])
    out = Path(cfg.output_dir)
    timm.models.save_for_hf(model, str(out), model_args=model_args, safe_serialization=True,
                            data_config=dict(mean=tuple(mean), std=tuple(std)))
    return {"format": "timm", "name": name, "model_args": model_args, "file": str(out / "model.safetensors"), "dir": str(out)}


def export_pth(sd: dict, meta: dict, cfg: ExportConfig) -> dict:
    """One consolidated weights file in the official layout; returns what it wrote."""
    import torch

    out = Path(cfg.output_dir) / "checkpoint.pth"
    torch.save({"model": sd, **{k: meta[k] for k in ("config", "step", "epoch") if k in meta}}, out)
    return {"format": "pth", "file": str(out), "dir": str(out.parent)}


def export(cfg: ExportConfig) -> dict:
    from fastmae.eval.models import read_source

    cfg.validate()
    sd, meta = read_source(cfg.ckpt)  # a DCP folder is verified and consolidated there
    if sd is None:
        raise ValueError("--ckpt must be a checkpoint file or folder")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    writer = {"hf": export_hf, "timm": export_timm, "pth": export_pth}[cfg.format]
    return writer(sd, meta, cfg)


def _body(cfg: ExportConfig) -> int:
    r = export(cfg)
    if r["format"] == "pth":
        print(f"wrote {r['file']} (official MAE layout: {{'model': state dict}})")
    elif r["format"] == "hf":
        print(f"wrote {r['dir']} ({r['class']}); load with transformers.{r['class']}.from_pretrained({r['dir']!r})")
    else:
        print(f"wrote {r['dir']} (timm {r['name']}); load with timm.create_model('local-dir:{r['dir']}', pretrained=True, "
              f"num_classes=0)\n  or timm.create_model({r['name']!r}, pretrained=True, pretrained_cfg_overlay=dict(file="
              f"{r['file']!r}), num_classes=0, **{json.dumps(r['model_args'])})")
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, ExportConfig, {"default": {}}, _body, "export", __doc__)
