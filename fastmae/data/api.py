"""``build_loader`` (images) and ``build_video_loader`` (clips): the one switch between the torch, DALI
and synthetic loaders. Both return a :class:`fastmae.data.loader.BaseLoader` with the same position,
resume, sharding, output and bad-file contract."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .demo import demo_cache_dir, prepare_demo_dataset
from .loader import BaseLoader, ImageDataset, SyntheticLoader, TorchLoader
from .sources import has_split, holdout, open_source
from .text import printable

LOADERS = ("torch", "dali", "synthetic")
# torch loader's train crops: PIL resize; data.decode (torch uint8 resize, stated PSNR); data.dali_roi (DALI CPU
# ROI decode of the window in the workers + the same torch resize)
DECODES = ("pil", "fast", "dali_roi")
OUTPUTS = ("float", "uint8")
# The last four: the MAE paper's pretraining augmentation table (see augment.py); "crop_flip" is "mae".
AUGMENTS = ("mae", "linprobe", "finetune", "eval", "none", "crop", "crop_flip", "crop_color")

log = logging.getLogger("fastmae.data")

__all__ = ["build_loader", "build_video_loader", "LOADERS", "OUTPUTS", "AUGMENTS"]


def _check_common(loader: str, output: str, batch_size, img_size, world_size, rank, num_workers) -> None:
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    for name, v in (("batch_size", batch_size), ("img_size", img_size), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def build_loader(
    root_or_spec: str | os.PathLike | None,
    *,
    split: str = "train",
    batch_size: int,
    img_size: int,
    loader: str = "torch",
    output: str = "float",
    train: bool = True,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    drop_last: bool = True,
    shuffle: bool | None = None,
    num_samples: int = 1024,
    num_classes: int = 1000,
    min_size: int = 8,
    hw_decoder_load: float = 0.65,
    dali_decode: str = "roi",
    index_cache: str | os.PathLike | None = None,
    augment: str | None = None,
    classes: list[str] | None = None,
    require_labels: bool = False,
    holdout_fraction: float = 0.0,
    decode: str = "pil",
    repeat_samples: int = 1,
) -> BaseLoader:
    """Build a loader yielding ``(imgs, labels)``.

    imgs: float32 (N, 3, img_size, img_size) normalized with ImageNet mean/std (``output="float"``) or
    uint8 (N, img_size, img_size, 3) (``output="uint8"``); labels: int64 (N,), ``-1`` on the padding
    that ``drop_last=False`` adds to even out ranks (count ``labels >= 0``; see ``loader.py``).
    ``root_or_spec``: a class-folder tree (``ROOT/<class>/*`` or ``ROOT/{train,val}/<class>/*``, ids =
    sorted class names shared by both splits), tar shards with a ``.cls`` text-integer label (a
    pattern, one file, a directory of them, or ``ROOT/{train,val}/*.tar``), or ``"demo"`` (the
    embedded photo demo, built once under :func:`demo_cache_dir`).
    ``augment``: ``"mae"`` (random-resized crop 0.2-1 + flip; the default when ``train``),
    ``"linprobe"`` (crop 0.08-1 + flip), ``"finetune"`` (timm's RandAugment fine-tuning transform, float
    output only; the DALI loader hands it to the torch loader), ``"eval"`` (resize to img_size/0.875,
    center crop; the default otherwise); for pretraining ablations (the MAE paper's Table 1e) ``"none"`` (the
    eval geometry), ``"crop"`` (fixed-size random crop + flip), ``"crop_flip"`` (= ``"mae"``), ``"crop_color"``
    (``"mae"`` + color jitter; torch loader). Every draw is a pure function of (seed, epoch, index).
    ``classes``: pin the class names (e.g. the train loader's for a separate val spec). ``require_labels``: fail at
    build time on tar samples without a ``.cls`` label. ``shuffle`` defaults to ``train``; ``num_samples`` and
    ``num_classes`` only apply to ``loader="synthetic"``.
    ``index_cache``: optional directory keeping folder scans between runs (large data sets start faster).
    ``holdout_fraction``: for data without a ``val/`` split, a seeded share of the files (:func:`holdout`) is the
    val split and is left out of train; the loader's ``holdout_fraction`` then says so (0 = a real split).
    The loader's ``source`` is the scanned file table it reads.
    ``decode`` (torch loader, crop augmentations): ``"pil"`` (Pillow crop + bicubic resize) or ``"fast"``
    (:mod:`fastmae.data.decode`: the same windows, torch's uint8 bicubic-antialias resize, DCT-scaled JPEG
    decode where every window allows it) or ``"dali_roi"`` (:mod:`fastmae.data.dali_roi`: DALI's CPU decode of
    the window only in each worker, then the same torch resize; needs DALI). ``dali_decode`` (loader="dali",
    training crops): ``"roi"`` decodes only the window, ``"whole"`` the whole image (on the GPU: nvJPEG's
    hardware decoder) then crops in the resize. ``repeat_samples`` K > 1 (torch loader, training): each file is
    decoded once per epoch and gives K samples with their own crops and flips; an epoch is K x files samples.
    All arguments are validated and the dataset is scanned before any worker or pipeline starts.
    """
    augment = _check_build_args(loader, output, batch_size, img_size, world_size, rank, num_workers, repeat_samples,
                                decode, augment, train)
    common = dict(batch_size=batch_size, img_size=img_size, output=output, train=train, seed=seed, rank=rank,
                  shuffle=train if shuffle is None else shuffle, world_size=world_size, device=device, drop_last=drop_last)
    if loader == "synthetic":
        return SyntheticLoader(num_samples=num_samples, num_classes=num_classes, **common)
    if root_or_spec is None:
        raise ValueError(f"loader={loader!r} needs a dataset directory or shard pattern")
    loader = _dali_or_torch(loader, augment)
    roi = decode == "dali_roi" and augment not in ("finetune", "eval", "none")
    if loader == "dali" or roi:
        from .dali import import_dali

        import_dali()  # fail on a missing extra before scanning a large dataset
    scan = dict(min_size=min_size, crop=img_size, index_cache=index_cache, classes=classes, require_labels=require_labels)
    src, carve = _scanned_source(root_or_spec, split, holdout_fraction, seed, world_size, scan)
    ld = _make_loader(src, loader, augment, decode, roi, repeat_samples, num_workers, hw_decoder_load, dali_decode, common)
    ld.source = src
    ld.holdout_fraction = holdout_fraction if carve else 0.0
    return ld


def _scanned_source(root_or_spec, split: str, holdout_fraction: float, seed: int, world_size: int, scan: dict):
    """(the scanned source of ``split``, whether it was carved from train as a seeded holdout)."""
    if os.fspath(root_or_spec) == "demo":
        root_or_spec = prepare_demo_dataset(demo_cache_dir() / "demo")
    carve = holdout_fraction > 0 and not has_split(root_or_spec, "val")
    # A rank-sharded loader is built by every rank of the job together: rank 0 scans, the others receive the table.
    shared = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    src = open_source(root_or_spec, "train" if carve else split, shared=shared, **scan)
    return (holdout(src, holdout_fraction, seed, split) if carve else src), carve


def _check_build_args(loader: str, output: str, batch_size: int, img_size: int, world_size: int, rank: int,
                      num_workers: int, repeat_samples, decode: str, augment: str | None, train: bool) -> str:
    """Every argument of :func:`build_loader` that needs no data, checked before any scan; returns the augmentation."""
    _check_common(loader, output, batch_size, img_size, world_size, rank, num_workers)
    if not isinstance(repeat_samples, int) or repeat_samples < 1:
        raise ValueError(f"repeat_samples must be an int >= 1, got {repeat_samples!r}")
    if repeat_samples > 1 and loader != "torch":
        raise ValueError(f"repeat_samples > 1 needs loader='torch' (got {loader!r})")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "dali_roi" and (loader != "torch" or repeat_samples > 1):
        raise ValueError(f"decode='dali_roi' is a torch-loader decode without repeat_samples (got loader={loader!r}, "
                         f"repeat_samples={repeat_samples}); loader='dali' decodes crop windows itself")
    augment = augment or ("mae" if train else "eval")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if augment == "finetune" and output != "float":
        raise ValueError("augment='finetune' needs output='float' (random erasing fills boxes with normalized noise)")
    return augment


def _dali_or_torch(loader: str, augment: str) -> str:
    """The augmentations DALI cannot reproduce operator for operator run on the torch loader, with a warning."""
    if loader == "dali" and augment == "finetune":
        log.warning(
            "augment='finetune' runs on the torch loader: DALI has no operator-for-operator equivalent of timm's "
            "RandAugment (rand-m9-mstd0.5-inc1) and random erasing"
        )
        return "torch"
    if loader == "dali" and augment == "crop_color":
        log.warning("augment='crop_color' runs on the torch loader: DALI's color ops do not round as augment.color_jitter")
        return "torch"
    return loader


def _make_loader(src, loader: str, augment: str, decode: str, roi: bool, repeat_samples: int, num_workers: int,
                 hw_decoder_load: float, dali_decode: str, common: dict) -> BaseLoader:
    """The loader over a scanned source: DALI, the repeated-sampling loader, or torch workers (PIL/fast or ROI)."""
    if loader == "dali":
        from .dali import DaliLoader

        return DaliLoader(src, augment=augment, num_workers=num_workers, hw_decoder_load=hw_decoder_load,
                          dali_decode=dali_decode, **common)
    if repeat_samples > 1:
        from .repeat import RepeatLoader

        return RepeatLoader(src, repeat_samples, augment=augment, decode=decode, num_workers=num_workers, **common)
    if roi:
        from .dali_roi import RoiDataset

        dataset = RoiDataset(src, common["img_size"], augment, common["seed"], common["batch_size"])
    else:  # evaluation and finetune crops have no window to ROI-decode: they take the PIL path
        dataset = ImageDataset(src, common["img_size"], augment, common["seed"], decode)
    return TorchLoader(dataset, classes=src.classes, skipped=src.bad, num_workers=num_workers, **common)


def build_video_loader(
    root_or_spec: str | os.PathLike | None,
    *,
    split: str,
    batch_size: int,
    img_size: int,
    num_frames: int,
    frame_stride: int,
    loader: str = "torch",
    output: str = "float",
    train: bool = True,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    drop_last: bool = True,
    shuffle: bool | None = None,
    num_samples: int = 1024,
    num_classes: int = 400,
) -> BaseLoader:
    """Build a clip loader yielding ``(clips, labels)``.

    clips: float32 (N, 3, num_frames, img_size, img_size) normalized with ImageNet mean/std
    (``output="float"``) or uint8 (N, num_frames, img_size, img_size, 3); labels: int64 (N,).
    ``root_or_spec``: ``ROOT/{train,val}/<class>/*.webm|mkv|avi|mp4|mov`` (or ``ROOT/<class>/*``), or
    ``"demo"`` (embedded VP9 clips, built once under :func:`demo_cache_dir`). ``loader="torch"`` decodes
    with PyAV in ``num_workers`` processes, ``"dali"`` with DALI's CPU video decoder (VP8/VP9/MJPEG;
    ``num_workers`` threads), ``"synthetic"`` yields seeded random clips without files
    (``num_samples``/``num_classes`` apply to it only).
    """
    from .video import ClipDataset, DaliVideoLoader, scan_videos

    _check_common(loader, output, batch_size, img_size, world_size, rank, num_workers)
    for name, v in (("num_frames", num_frames), ("frame_stride", frame_stride)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    common = dict(batch_size=batch_size, img_size=img_size, output=output, train=train, seed=seed, rank=rank,
                  shuffle=train if shuffle is None else shuffle, world_size=world_size, device=device, drop_last=drop_last)
    if loader == "synthetic":
        return SyntheticLoader(num_samples=num_samples, num_classes=num_classes, num_frames=num_frames, **common)
    if root_or_spec is None:
        raise ValueError(f"loader={loader!r} needs a clip directory")
    if os.fspath(root_or_spec) == "demo":
        from .video_demo import prepare_video_demo

        root_or_spec = prepare_video_demo(demo_cache_dir())
    if loader == "dali":
        from .dali import import_dali

        import_dali()  # fail on a missing extra before probing every clip
    root = Path(root_or_spec)
    folder = root / split if (root / split).is_dir() else root
    if split == "val" and folder == root and (root / "train").is_dir():
        raise FileNotFoundError(f"clip set {printable(root)} has a train/ split but no val/ split")
    span = (num_frames - 1) * frame_stride + 1
    items, bad, classes = scan_videos(folder, span, loader)
    if not items:
        reasons = "; ".join(f"{printable(Path(p).name)}: {printable(r)}" for p, r in bad[:3])
        where = printable(folder)
        raise ValueError(f"no usable clip of {span} frames in {where}" + (f" ({len(bad)} skipped: {reasons})" if bad else ""))
    if bad:
        first = "; ".join(f"{printable(p)}: {printable(r)}" for p, r in bad[:3])
        log.warning("skipping %d clip(s) in %s (%s)", len(bad), printable(folder), first)
    dataset = ClipDataset(items, img_size=img_size, num_frames=num_frames, frame_stride=frame_stride, train=train, seed=seed)
    if loader == "dali":
        return DaliVideoLoader(dataset, classes=classes, skipped=bad, num_workers=num_workers, **common)
    return TorchLoader(dataset, classes=classes, skipped=bad, num_workers=num_workers, **common)
