"""``build_loader``: the one switch between the torch, DALI and synthetic loaders."""

from __future__ import annotations

import os

import torch

from .loader import BaseLoader, SyntheticLoader, TorchLoader
from .sources import has_split, holdout, open_source

LOADERS = ("torch", "dali", "synthetic")
OUTPUTS = ("float", "uint8")


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
    index_cache: str | os.PathLike | None = None,
    holdout_fraction: float = 0.0,
) -> BaseLoader:
    """Build a loader yielding ``(imgs, labels)``.

    imgs: float32 (N, 3, img_size, img_size) normalized with ImageNet mean/std (``output="float"``) or
    uint8 (N, img_size, img_size, 3) (``output="uint8"``); labels: int64 (N,).
    ``shuffle`` defaults to ``train``. ``num_samples``/``num_classes`` only apply to ``loader="synthetic"``.
    ``index_cache``: optional directory keeping folder scans between runs (large data sets start faster).
    ``holdout_fraction``: for data without a ``val/`` split, a seeded share of the files (:func:`holdout`) is the
    val split and is left out of train; the loader's ``holdout_fraction`` then says so (0 = a real split).
    All arguments are validated and the dataset is scanned before any worker or pipeline starts.
    """
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
    common = dict(
        batch_size=batch_size,
        img_size=img_size,
        output=output,
        train=train,
        shuffle=train if shuffle is None else shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=device,
        drop_last=drop_last,
    )
    if loader == "synthetic":
        return SyntheticLoader(num_samples=num_samples, num_classes=num_classes, **common)
    if root_or_spec is None:
        raise ValueError(f"loader={loader!r} needs a dataset directory or shard pattern")
    if loader == "dali":
        from .dali import DaliLoader, _import_dali

        _import_dali()  # fail on a missing extra before scanning a large dataset
    carve = holdout_fraction > 0 and not has_split(root_or_spec, "val")
    src = open_source(root_or_spec, "train" if carve else split, min_size=min_size, crop=img_size, index_cache=index_cache)
    if carve:
        src = holdout(src, holdout_fraction, seed, split)
    if loader == "dali":
        ld = DaliLoader(src, num_workers=num_workers, hw_decoder_load=hw_decoder_load, **common)
    else:
        ld = TorchLoader(src, num_workers=num_workers, **common)
    ld.holdout_fraction = holdout_fraction if carve else 0.0
    return ld
