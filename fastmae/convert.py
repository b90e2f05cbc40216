"""Checkpoint interchange: official MAE ``.pth`` files, timm encoders, ``transformers`` ViTMAE.

fastmae's state dict *is* the official one (same names, shapes and
semantics), so official files load with ``strict=True`` and no renaming.
The official files carry a pickled ``argparse.Namespace`` next to the
weights; they are read with ``weights_only=True`` and an allow-list holding
that one class, never with arbitrary unpickling.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]

_DECODER_PREFIXES = ("decoder_", "mask_token")


def check_embedded_crc(path: Path) -> None:
    """Verify the CRC-32 that torch's zip format stores for every member (data.pkl and each tensor's bytes).

    torch.load never checks it, so without this a flipped bit in a tensor loads as a different number. This
    is the checksum a checkpoint carries inside itself: damage is found with or without a sidecar file.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint {path}: damaged zip structure ({str(e).splitlines()[0][:200]})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {path} fails its embedded CRC-32 check in {bad} (corrupted on disk)")


def read_checkpoint(path: str | os.PathLike, verify_crc: bool = True) -> dict:
    """Load a checkpoint file safely (tensors, containers and argparse.Namespace only).

    A run folder stands for its latest ``checkpoint-*.pt`` (``--ckpt=runs/mae-tiny``). Zip-format files
    (every torch.save since 1.6) are checked against their embedded CRC-32s first (``verify_crc=False``:
    the caller already checked a stronger checksum of the whole file).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("checkpoint-*.pt"))
        if not found:
            raise FileNotFoundError(f"no checkpoint-*.pt in run folder {path}")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify_crc and zipfile.is_zipfile(path):
        check_embedded_crc(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path}: {first[:300]}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict (a state dict or {{'model': ...}})")
    check_checkpoint_fields(ckpt, f"checkpoint {path}")
    return ckpt


# Bounds for architecture fields read from a file: a hostile value must not reach an allocation or a loop.
_ARCH_BOUNDS = {"img_size": (1, 4096), "patch_size": (1, 4096), "in_chans": (1, 64), "embed_dim": (1, 65536),
                "depth": (1, 1024), "num_heads": (1, 4096), "mlp_ratio": (0.0, 64.0)}
MAX_BLOCKS = 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _ints_in(v, lo: int, hi: int, n: int | None = None) -> bool:
    return isinstance(v, (list, tuple)) and (n is None or len(v) == n) and all(_is_int(x) and lo <= x <= hi for x in v)


def _check_rng(rng, where: str) -> None:
    """An RNG state as :func:`fastmae.engine.checkpoint.rng_state` writes it (or one per rank)."""
    for r in rng if isinstance(rng, list) else [rng]:
        ok = isinstance(r, dict)
        py = r.get("python") if ok else None
        ok = ok and isinstance(py, (list, tuple)) and len(py) == 3 and _is_int(py[0]) and _ints_in(py[1], 0, 2**32, 625)
        n = r.get("numpy") if ok else None
        ok = ok and isinstance(n, dict) and _ints_in(n.get("keys"), 0, 2**32 - 1, 624) and _is_int(n.get("pos")) \
            and 0 <= n["pos"] <= 624 and n.get("has_gauss") in (0, 1) and _is_num(n.get("cached_gaussian"))
        ok = ok and _ints_in(r.get("torch"), 0, 255, torch.get_rng_state().numel())
        ok = ok and all(_ints_in(s, 0, 255) for s in r.get("cuda", []) or []) and isinstance(r.get("cuda", []), list)
        if not ok:
            raise ValueError(f"{where}: 'rng' is not a saved RNG state (wrong types or sizes)")


def check_arch(arch, where: str) -> None:
    """Architecture keys (an eval checkpoint's ``arch``, or what a state dict implies) within sane bounds."""
    if not isinstance(arch, dict):
        raise ValueError(f"{where}: 'arch' must be a dict, got {type(arch).__name__}")
    for key, (lo, hi) in _ARCH_BOUNDS.items():
        v = arch.get(key)
        if v is not None and not ((_is_int(v) or key == "mlp_ratio" and _is_num(v)) and lo <= v <= hi):
            raise ValueError(f"{where}: {key}={v!r} is not a{'' if key == 'mlp_ratio' else 'n integer'} value "
                             f"in [{lo}, {hi}]")


def _check_norm_stats(ckpt: dict, where: str) -> None:
    for key in ("pixel_mean", "pixel_std"):
        v = ckpt.get(key)
        if v is not None and not (isinstance(v, (list, tuple)) and 1 <= len(v) <= 64 and all(_is_num(x) for x in v)
                                  and (key == "pixel_mean" or all(x > 0 for x in v))):
            raise ValueError(f"{where}: {key} must be 1-64 finite numbers{' > 0' if key == 'pixel_std' else ''}, "
                             f"got {str(v)[:80]}")


# Config keys readers take from any checkpoint's ``config`` (pretraining or evaluation): (type, low, high).
_CONFIG_FIELDS = {"img_size": (int, 0, 4096), "patch_size": (int, 0, 4096), "mask_ratio": (float, -1.0, 0.999),
                  "epochs": (int, 0, 10**6), "max_steps": (int, 0, 10**9), "warmup_epochs": (float, 0, 10**6),
                  "lr": (float, 0, 10.0), "blr": (float, 0, 10.0), "min_lr": (float, 0, 10.0), "model": (str, 0, 0),
                  "method": (str, 0, 0), "mask_patch_size": (int, 0, 4096)}


def _check_config(cfg, where: str) -> None:
    """The fields of a stored ``config`` that readers use, typed and in range (null schedule fields, an img_size
    of 10^7 and the like are refused here); resume validates the whole pretraining config on top."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: 'config' must be a dict, got {type(cfg).__name__}")
    cfg = _unnest(cfg)
    for key, (typ, lo, hi) in _CONFIG_FIELDS.items():
        if key not in cfg:
            continue
        v = cfg[key]
        ok = isinstance(v, str) if typ is str else (_is_int(v) if typ is int else _is_num(v)) and lo <= v <= hi
        if not ok:
            raise ValueError(f"{where}: config {key}={repr(v)[:60]} is not "
                             + ("a name" if typ is str else f"a{'n integer' if typ is int else ' number'} in [{lo}, {hi}]"))


def _unnest(cfg: dict) -> dict:
    """A config nested by section (evaluation checkpoints store ``asdict(cfg)``: ``{"model": {"name": ..., "img_size":
    ...}}``) as flat keys, by the configs' convention: a section's ``name`` / ``path`` field is the section's own flat
    key (``model.name`` is ``--model``, ``data.path`` is ``--data``), any other field keeps its name."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update({k if n in ("name", "path") else n: x for n, x in v.items()})
        else:
            out[k] = v
    return out


def check_checkpoint_fields(ckpt: dict, where: str) -> None:
    """Type- and range-check every metadata field a fastmae, eval or official checkpoint may carry, before any
    reader uses one; ValueError with one line naming the field. The model weights: :func:`model_state_dict`."""
    for key in ("step", "epoch"):
        if key in ckpt and not (_is_int(ckpt[key]) and ckpt[key] >= 0):
            raise ValueError(f"{where}: {key} must be a non-negative integer, got {repr(ckpt[key])[:60]}")
    if "rng" in ckpt and ckpt["rng"] != {}:
        _check_rng(ckpt["rng"], where)
    if "config" in ckpt:
        _check_config(ckpt["config"], where)
    if "arch" in ckpt:
        check_arch(ckpt["arch"], where)
    _check_norm_stats(ckpt, where)
    if isinstance(ckpt.get("model"), dict):
        _check_block_ids(ckpt["model"])
    args = ckpt.get("args")
    if args is not None:
        ratio, model = getattr(args, "mask_ratio", 0.75), getattr(args, "model", "")
        if not (_is_num(ratio) and 0 <= ratio < 1 and isinstance(model, str)):
            raise ValueError(f"{where}: args.mask_ratio={ratio!r} / args.model={model!r} are not a ratio and a name")


def _check_block_ids(sd: StateDict) -> None:
    """Block indices must run 0..n-1 (n <= MAX_BLOCKS): a stray 'blocks.1000000000.x' must not build a giant model."""
    for prefix in ("blocks.", "decoder_blocks.", "vit.layers.", "decoder.decoder_layers."):
        ids = _blocks(sd, prefix)
        if ids and (ids != list(range(len(ids))) or len(ids) > MAX_BLOCKS):
            shown = ids if len(ids) < 6 else [*ids[:2], "...", *ids[-2:]]
            raise ValueError(f"model weights have {prefix}N indices {shown}: expected 0..n-1 with n <= {MAX_BLOCKS}")


def model_state_dict(ckpt: dict) -> StateDict:
    """The model weights inside an official or fastmae checkpoint (``{'model': ...}``) or a bare state dict.

    Raises ValueError naming the problem when there are none, or when an entry is not a tensor.
    """
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a checkpoint dict, got a {type(ckpt).__name__}")
    sd = None
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            sd = ckpt[key]
            break
    if sd is None:
        if not any(isinstance(v, Tensor) for v in ckpt.values()):
            keys = sorted(map(str, ckpt))[:10]
            raise ValueError(f"no model weights found in checkpoint (top-level keys: {keys}); expected {{'model': state dict}}")
        sd = ckpt
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"model weights must be named tensors; {len(bad)} entries are not: {', '.join(bad[:3])}")
    _check_block_ids(sd)
    return sd


def is_encoder_key(key: str) -> bool:
    return not key.startswith(_DECODER_PREFIXES)


def encoder_state_dict(sd: StateDict) -> StateDict:
    """Encoder weights only: exactly the keys of a timm ``VisionTransformer`` without head."""
    return {k: v for k, v in sd.items() if is_encoder_key(k)}


def describe_mismatch(model: nn.Module, sd: StateDict, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a model and a state dict: shapes first, then missing, unexpected."""
    own = model.state_dict()
    shapes = [
        f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    missing = [
        f"missing in checkpoint: {k} {tuple(own[k].shape)}"
        for k in sorted(set(own) - set(sd))
        if not (allow_missing and k.startswith(allow_missing))
    ]
    unexpected = [f"unexpected in checkpoint: {k} {tuple(sd[k].shape)}" for k in sorted(set(sd) - set(own))]
    return shapes + missing + unexpected


def load_into(model: nn.Module, sd: StateDict, strict: bool = True, allow_missing: tuple[str, ...] = ()) -> None:
    """load_state_dict with a clear error listing the mismatching keys and shapes."""
    problems = describe_mismatch(model, sd, allow_missing)
    if not strict:
        problems = [p for p in problems if p.startswith("shape")]
    if problems:
        counts = {kind: sum(p.startswith(kind) for p in problems) for kind in ("shape", "missing", "unexpected")}
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__} ({counts['shape']} shape mismatches, "
            f"{counts['missing']} missing, {counts['unexpected']} unexpected):\n  {shown}{more}"
        )
    model.load_state_dict(sd, strict=False)


def save_timm_encoder(model_or_sd: nn.Module | StateDict, path: str | os.PathLike) -> None:
    """Write the encoder as a timm VisionTransformer state dict in safetensors."""
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    enc = {k: v.detach().contiguous().cpu() for k, v in encoder_state_dict(sd).items()}
    save_file(enc, str(path))


# ---- transformers ViTMAE ----------------------------------------------------------------------------------

# (official suffix, transformers suffix) inside one block; qkv is handled apart (fused vs split).
_BLOCK_MAP = [
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("attn.proj", "attention.o_proj"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
_TOP_MAP = [
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "vit.layernorm.weight"),
    ("norm.bias", "vit.layernorm.bias"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_embed.weight", "decoder.decoder_embed.weight"),
    ("decoder_embed.bias", "decoder.decoder_embed.bias"),
    ("decoder_norm.weight", "decoder.decoder_norm.weight"),
    ("decoder_norm.bias", "decoder.decoder_norm.bias"),
    ("decoder_pred.weight", "decoder.decoder_pred.weight"),
    ("decoder_pred.bias", "decoder.decoder_pred.bias"),
]
# transformers < 5 spelled the block parameters differently; read both.
_HF_LEGACY = [
    (r"vit\.encoder\.layer\.", "vit.layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


def _blocks(sd: StateDict, prefix: str) -> list[int]:
    ids = {int(m.group(1)) for k in sd if isinstance(k, str) and (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return sorted(ids)


def to_hf_vitmae(sd: StateDict) -> StateDict:
    """Official/fastmae MAE state dict -> ``ViTMAEForPreTraining`` state dict (transformers >= 5 names)."""
    out: StateDict = {}
    for ours, theirs in _TOP_MAP:
        if ours in sd:
            out[theirs] = sd[ours]
    for ours_prefix, hf_prefix in (("blocks.", "vit.layers."), ("decoder_blocks.", "decoder.decoder_layers.")):
        for i in _blocks(sd, ours_prefix):
            src, dst = f"{ours_prefix}{i}.", f"{hf_prefix}{i}."
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
                out[f"{dst}attention.q_proj.{kind}"] = q
                out[f"{dst}attention.k_proj.{kind}"] = k
                out[f"{dst}attention.v_proj.{kind}"] = v
                for a, b in _BLOCK_MAP:
                    out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def from_hf_vitmae(hf_sd: StateDict) -> StateDict:
    """``ViTMAEForPreTraining`` state dict (transformers 4 or 5 names) -> official/fastmae names."""
    norm: StateDict = {}
    for k, v in hf_sd.items():
        for pat, rep in _HF_LEGACY:
            k = re.sub(pat, rep, k)
        norm[k] = v
    out: StateDict = {}
    for ours, theirs in _TOP_MAP:
        if theirs in norm:
            out[ours] = norm[theirs]
    for ours_prefix, hf_prefix in (("blocks.", "vit.layers."), ("decoder_blocks.", "decoder.decoder_layers.")):
        for i in _blocks(norm, hf_prefix):
            src, dst = f"{hf_prefix}{i}.", f"{ours_prefix}{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                    [norm[f"{src}attention.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0
                )
                for a, b in _BLOCK_MAP:
                    out[f"{dst}{a}.{kind}"] = norm[f"{src}{b}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def hf_config_kwargs(model: nn.Module) -> dict:
    """``ViTMAEConfig`` keyword arguments describing a fastmae MAE or encoder (layer_norm_eps from the model)."""
    blk = model.blocks[0]
    kw = dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_size,
        num_channels=model.in_chans,
        layer_norm_eps=blk.norm1.eps,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if hasattr(model, "decoder_blocks"):
        dblk = model.decoder_blocks[0]
        kw.update(
            decoder_hidden_size=model.decoder_embed_dim,
            decoder_num_hidden_layers=len(model.decoder_blocks),
            decoder_num_attention_heads=dblk.attn.num_heads,
            decoder_intermediate_size=dblk.mlp.fc1.out_features,
            norm_pix_loss=model.norm_pix_loss,
        )
    return kw


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | StateDict,
    *,
    strict: bool = True,
    allow_missing: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
) -> StateDict:
    """Load an official or fastmae checkpoint (full MAE or encoder-only) into an MAE or a ViT.

    Decoder weights are dropped when the model has no decoder; keys starting
    with ``drop`` are ignored; keys starting with ``allow_missing`` may be
    absent (e.g. a fresh classification head). Position tables made for another
    grid are regenerated when the model's table is the fixed sin-cos one, and
    bicubically resized when it is learned. Returns the state dict that was loaded.
    """
    from timm.layers import resample_abs_pos_embed

    sd = dict(model_state_dict(source if isinstance(source, dict) else read_checkpoint(source)))
    own = model.state_dict()
    if not any(k.startswith(_DECODER_PREFIXES) for k in own):
        sd = encoder_state_dict(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)} if drop else sd
    params = dict(model.named_parameters())
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            if sd[key].shape[-1] != own[key].shape[-1]:
                continue  # a width mismatch is reported by load_into
            if params[key].requires_grad:
                grid = model.patch_embed.grid_size
                sd[key] = resample_abs_pos_embed(sd[key], list(grid), num_prefix_tokens=1)
            else:
                sd[key] = own[key]
    load_into(model, sd, strict=strict, allow_missing=allow_missing)
    return sd
