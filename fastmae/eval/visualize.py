"""``fastmae visualize``: reconstruction grids (original | masked | reconstruction | pasted) for a full MAE or SimMIM checkpoint.

Norm-pix predictions are mapped back with each patch's true mean/std before
display (raw norm-pix outputs look broken). The mask comes from ``--seed`` or
from ``--mask``: a ``.npy``/``.pt`` array of 0/1 (1 = removed) shaped (L,),
(gh, gw) or (N, L), with the same number of removed patches in every row.

SimMIM checkpoints (encoder with ``mask_token`` and the linear ``decoder_pred``
head, no MAE decoder) show SimMIM's view: masked cells of ``mask_patch_size`` px
replaced by the mask token in the encoder, the head's pixels for every patch
(only the masked ones are trained), and those pasted into the masked cells.
The mask is drawn per cell from ``--seed`` (``--mask`` files are MAE's patch masks).

Examples:
    fastmae visualize --ckpt=runs/mae-tiny --images=photo1.jpg,photo2.jpg
    fastmae visualize --ckpt=runs/demo_eval/mae_pretrained.pt --images=digits --num_images=8 --mask=mask.npy
    fastmae visualize --ckpt=runs/simmim-tiny --images=photo1.jpg
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastmae.eval.analyze import load_images
from fastmae.eval.config import arch_key
from fastmae.eval.models import infer_arch, named_heads, resolve_arch
from fastmae.flags import key, run_cli
from fastmae.methods.registry import build_meta_model
from fastmae.methods.simmim import SimMIMViT
from fastmae.models.crossmae import CrossMAE
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.vit import LayerNorm6

# Decoder heads of an unnamed checkpoint (the state dict does not record them): the official models'.
OFFICIAL_DECODER_HEADS = 16


@dataclass
class VisualizeConfig:
    preset: str = key("default", "named set of defaults; the values below are this preset's")
    ckpt: str = key("", "checkpoint file (fastmae or official MAE pretraining, with its decoder)")
    images: str = key("digits", "'digits' (held-out split), a folder, or comma-separated image files")
    num_images: int = key(8, "how many images to use")
    mask_ratio: float = key(-1.0, "fraction of patches removed; -1 = the method's (MAE 0.75, SimMIM 0.6)")
    mask: str = key("", "optional .npy/.pt mask (1 = removed); overrides mask_ratio (MAE)")
    mask_patch_size: int = key(0, "SimMIM mask cell in pixels (a multiple of patch_size); 0 = from the checkpoint")
    seed: int = key(0, "random seed (data order, masks, init)")
    output: str = key("runs/visualize/reconstructions.png", "file to write")
    scale: int = key(4, "pixel upscaling of the picture")
    num_heads: int = arch_key("num_heads")
    decoder_num_heads: int = arch_key("decoder_num_heads")
    norm_pix_loss: str = key("auto", "the model predicts per-patch normalized pixels: auto (from the checkpoint) | "
                             "true | false")

    def validate(self) -> None:
        if not self.ckpt:
            raise ValueError("--ckpt is required: a full MAE checkpoint (encoder and decoder)")
        if not (0.0 <= self.mask_ratio < 1.0 or self.mask_ratio == -1.0):
            raise ValueError(f"mask_ratio must be in [0, 1) (or -1 for the method's), got {self.mask_ratio}")
        if self.num_images < 1 or self.scale < 1:
            raise ValueError("num_images and scale must be positive")
        if self.norm_pix_loss not in ("auto", "true", "false"):
            raise ValueError(f"norm_pix_loss must be auto, true or false, got {self.norm_pix_loss!r}")


def is_simmim(sd: dict) -> bool:
    """SimMIM's state dict: a mask token and a linear pixel head on the encoder, no MAE decoder."""
    return "decoder_pred.weight" in sd and "mask_token" in sd and "decoder_embed.weight" not in sd


def build_simmim(sd: dict, meta: dict, cfg: VisualizeConfig) -> SimMIMViT:
    """The SimMIM model of a checkpoint: the cell size and heads from its config (or the named model's defaults)."""
    cfg_meta = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    name = cfg_meta.get("model")
    named = build_meta_model(name) if name else None
    recorded_heads = infer_arch(sd, meta).get("num_heads")
    named_heads = named.blocks[0].attn.num_heads if named is not None else 0
    arch = resolve_arch(sd, meta, {"num_heads": cfg.num_heads or recorded_heads or named_heads})
    cell = cfg.mask_patch_size or int(cfg_meta.get("mask_patch_size") or 0) or getattr(named, "mask_patch_size", 0)
    if not cell:
        raise ValueError("the checkpoint does not record SimMIM's mask cell size: pass --mask_patch_size=PX")
    C = arch["in_chans"]
    mean = tuple(meta.get("pixel_mean") or ((0.485, 0.456, 0.406) if C == 3 else (0.5,) * C))
    std = tuple(meta.get("pixel_std") or ((0.229, 0.224, 0.225) if C == 3 else (0.5,) * C))
    model = SimMIMViT(mask_patch_size=int(cell), **arch, norm_layer=LayerNorm6, pixel_mean=mean, pixel_std=std)
    from fastmae.convert import load_into

    load_into(model, sd, strict=True)
    return model


def build_mae(sd: dict, meta: dict, cfg: VisualizeConfig) -> MaskedAutoencoderViT | CrossMAE:
    """The full MAE of a checkpoint; the decoder's shape is read from its weights.

    A decoder of cross-attention blocks (``decoder_blocks.*.attn.kv``) is CrossMAE's: it is rebuilt as
    :class:`CrossMAE` (feature fusion if the checkpoint has its weights) and, in eval mode, decodes every
    removed patch."""
    if "decoder_embed.weight" not in sd:
        raise ValueError("the checkpoint has no decoder weights (encoder-only or fine-tuned): "
                         "reconstructions need a full MAE pretraining checkpoint")
    arch = resolve_arch(sd, meta, {"num_heads": cfg.num_heads})
    dec = meta.get("decoder") if isinstance(meta.get("decoder"), dict) else {}
    ddim = sd["decoder_embed.weight"].shape[0]
    ddepth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder_blocks\.(\d+)\.", k)))
    cfg_meta = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    name = cfg_meta.get("model") or getattr(meta.get("args"), "model", None)
    named = named_heads(name)
    dheads = cfg.decoder_num_heads or dec.get("decoder_num_heads") or (named and named[1]) or OFFICIAL_DECODER_HEADS
    if cfg.norm_pix_loss != "auto":
        npl = cfg.norm_pix_loss == "true"
    elif "norm_pix_loss" in dec:
        npl = bool(dec["norm_pix_loss"])
    elif "norm_pix_loss" in cfg_meta:
        npl = bool(cfg_meta["norm_pix_loss"])
    else:
        npl = bool(getattr(meta.get("args"), "norm_pix_loss", False))
    C = arch["in_chans"]
    mean = tuple(meta.get("pixel_mean") or ((0.485, 0.456, 0.406) if C == 3 else (0.5,) * C))
    std = tuple(meta.get("pixel_std") or ((0.229, 0.224, 0.225) if C == 3 else (0.5,) * C))
    extra = {}
    cls = MaskedAutoencoderViT
    if "decoder_blocks.0.attn.kv.weight" in sd:
        cls, extra = CrossMAE, {"feature_fusion": "decoder_fusion.weight" in sd}
    model = cls(**arch, decoder_embed_dim=ddim, decoder_depth=ddepth, decoder_num_heads=dheads,
                norm_layer=LayerNorm6, norm_pix_loss=npl, pixel_mean=mean, pixel_std=std, **extra)
    from fastmae.convert import load_pretrained

    load_pretrained(model, sd, strict=True)
    return model


def mask_to_noise(mask: Tensor, n: int, L: int) -> tuple[Tensor, float]:
    """0/1 mask (1 = removed) -> (noise (n, L), mask_ratio) that make the model remove exactly those patches."""
    m = mask.float()
    if m.ndim == 2 and m.shape[0] * m.shape[1] == L and m.shape[0] != n:
        m = m.reshape(1, L)
    if m.ndim == 1:
        m = m.reshape(1, L) if m.numel() == L else m
    if m.ndim != 2 or m.shape[1] != L or m.shape[0] not in (1, n):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {n} images of {L} patches: "
                         f"give (L,), (gh, gw) or (N, L)")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask values must be 0 (visible) or 1 (removed)")
    removed = m.sum(dim=1)
    if not bool((removed == removed[0]).all()):
        raise ValueError(f"every image needs the same number of removed patches, got {sorted(set(removed.int().tolist()))}")
    k = int(removed[0])
    if k >= L:
        raise ValueError("the mask removes every patch; keep at least one visible")
    m = m.expand(n, L)
    # Visible patches sort first (noise < 1), in patch order; the ratio reproduces exactly k removed patches.
    noise = m + torch.arange(L, dtype=torch.float32).div(2 * L).expand(n, L)
    ratio = max(k - 0.5, 0.0) / L
    return noise, ratio


def _read_mask(path: str) -> Tensor:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mask file not found: {p}")
    if p.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(f"mask must be a .npy or .pt file, got {p.name}")
    try:
        mask = torch.from_numpy(np.load(p, allow_pickle=False)) if p.suffix == ".npy" else \
            torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's weights-only message runs to many lines: one line naming the file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"--mask {p}: not a saved tensor ({first})") from None
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16,
                                                               torch.int32, torch.int64, torch.float16, torch.float32,
                                                               torch.float64, torch.bfloat16):
        raise ValueError(f"--mask {p}: holds a {type(mask).__name__}, expected a 0/1 tensor of shape (N, L)")
    return mask


def visualize(cfg: VisualizeConfig) -> Path:
    from fastmae.eval.models import read_source
    from fastmae.viz import reconstruct, save_grid

    cfg.validate()
    sd, meta = read_source(cfg.ckpt)
    if sd is None:
        raise ValueError("--ckpt must be a checkpoint file (reconstructions need a trained decoder or pixel head)")
    simmim = is_simmim(sd)
    model = build_simmim(sd, meta, cfg) if simmim else build_mae(sd, meta, cfg)
    C, S = model.in_chans, model.patch_embed.img_size[0]
    if cfg.images == "digits":
        from fastmae.eval.data import load_digits_split

        d = load_digits_split(S, C, seed=cfg.seed)
        imgs, mean, std = d.test_x[: cfg.num_images], d.mean, d.std
    else:
        mean, std = model.pixel_mean.tolist(), model.pixel_std.tolist()
        imgs = load_images(cfg.images, S, C, cfg.num_images, mean, std, cfg.seed)
    L = model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(cfg.seed)
    if simmim:
        if cfg.mask:
            raise ValueError("--mask files are MAE patch masks; SimMIM masks whole cells drawn from --seed")
        g = model.patch_embed.grid_size
        cells = (g[0] * model.patch_size // model.mask_patch_size) * (g[1] * model.patch_size // model.mask_patch_size)
        noise, ratio = torch.rand(len(imgs), cells, generator=gen), 0.6 if cfg.mask_ratio < 0 else cfg.mask_ratio
    elif cfg.mask:
        noise, ratio = mask_to_noise(_read_mask(cfg.mask), len(imgs), L)
    else:
        noise, ratio = torch.rand(len(imgs), L, generator=gen), 0.75 if cfg.mask_ratio < 0 else cfg.mask_ratio
    panels = reconstruct(model, imgs, mask_ratio=ratio, noise=noise)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "visualize_config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return save_grid(panels, out, mean, std, scale=cfg.scale)


def _body(cfg: VisualizeConfig) -> int:
    path = visualize(cfg)
    print(f"wrote {path}")
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, VisualizeConfig, {"default": {}}, _body, "visualize", __doc__)
