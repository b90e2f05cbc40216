"""Labelled data for evaluation: streamed through ``fastmae.data`` loaders, or the embedded digits held in memory.

At scale (``--data=ROOT`` with ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``,
or ``--train_data``/``--val_data``, each a class-folder tree or webdataset tar
shards with a ``cls`` field) both splits stream through
:func:`fastmae.data.build_loader`: sharded by rank, resumable mid-epoch, never
held in memory. Training batches are augmented for the protocol; validation
batches are the eval transform (resize to img / 0.875, center crop), sharded so
that every sample is counted exactly once across ranks: the loaders pad each
rank's share by wrap-around and the padding carries the label ``IGNORE`` (-1).

The demo (``--data`` unset) is scikit-learn's ``load_digits()`` (1,797
labelled 8x8 images shipped inside the package), upsampled bilinearly to
``img_size`` and split once, stratified, with a fixed seed; it is served by
:class:`TensorLoader`, an in-memory loader with the same contract (sharding,
resume, padding labels), so one training loop serves both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastmae.data.loader import BaseLoader

IGNORE = -1  # label of validation padding: never counted
AUGMENTS = ("mae", "linprobe", "finetune", "eval")


@dataclass
class LabelledSplit:
    """train_x/test_x: (N, C, H, W) float32, normalized; train_y/test_y: (N,) int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_x.shape[-1]


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, test), stratified by class (scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    counts = np.bincount(np.unique(y, return_inverse=True)[1])
    if counts.min() < 2:
        raise ValueError(f"a stratified split needs at least 2 images per class, the smallest class has {counts.min()}")
    n_test = max(int(round(test_fraction * len(y))), len(counts))
    if len(y) - n_test < len(counts):
        raise ValueError(f"{len(y)} images in {len(counts)} classes are too few to split {test_fraction:.0%} off")
    tr, te = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def load_digits_split(img_size: int = 16, in_chans: int = 1, test_fraction: float = 0.25, seed: int = 0) -> LabelledSplit:
    """scikit-learn digits (10 classes), upsampled to img_size x img_size, normalized with the training split's stats."""
    from sklearn.datasets import load_digits

    d = load_digits()
    t = torch.from_numpy((d.images / 16.0)[:, None].astype(np.float32))  # (1797, 1, 8, 8), values 0..16 in the source
    if t.shape[-1] != img_size:
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if in_chans != 1:
        t = t.expand(-1, in_chans, -1, -1).contiguous()
    tr, te = stratified_split(d.target, test_fraction, seed)
    mean = t[tr].mean(dim=(0, 2, 3))
    std = t[tr].std(dim=(0, 2, 3)).clamp_min(1e-6)
    t = (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return LabelledSplit(t[tr].contiguous(), y[tr], t[te].contiguous(), y[te], [str(c) for c in d.target_names],
                         tuple(mean.tolist()), tuple(std.tolist()))


def carve_validation(x: Tensor, y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a stratified validation part off the TRAINING data -> (train_x, train_y, val_x, val_y)."""
    tr, va = stratified_split(y.numpy(), fraction, seed)
    return x[tr], y[tr], x[va], y[va]


class TensorLoader(BaseLoader):
    """Batches of in-memory tensors with the loader contract: rank shards, ``(epoch, step)`` resume, padding labels.

    x: (N, C, H, W) float normalized, y: (N,) int64; both moved to ``device`` once.
    Training (``train=True``): shuffled per epoch, last partial batch dropped.
    Evaluation: in order, every sample once over the ranks (padding labelled ``IGNORE``).
    """

    kind = "tensor"

    def __init__(self, x: Tensor, y: Tensor, *, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", classes: list[str]) -> None:
        super().__init__(num_samples=len(y), batch_size=batch_size, img_size=x.shape[-1], output="float", train=train,
                         shuffle=train, seed=seed, rank=rank, world_size=world_size, device=device, drop_last=train,
                         classes=classes)
        self.x = x.to(self.device)
        self.y = y.to(self.device)

    def _batches(self, epoch, start):
        idx = torch.from_numpy(self.epoch_indices(epoch)).to(self.device)
        bs = self.batch_size
        for s in range(start, self.steps_per_epoch):
            sel = idx[s * bs : (s + 1) * bs]
            yield self.x[sel], self.y[sel]  # BaseLoader labels the wrap-around padding IGNORE


def stream_loaders(train_spec: str, val_spec: str, *, img_size: int, batch_size: int, eval_batch_size: int,
                   augment: str, loader: str, num_workers: int, seed: int, rank: int, world_size: int,
                   device: torch.device) -> tuple[BaseLoader, BaseLoader]:
    """-> (train loader, validation loader) over class folders or tar shards, labels required, class ids shared."""
    from fastmae.data import build_loader

    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    common = dict(img_size=img_size, loader=loader, num_workers=num_workers, seed=seed, rank=rank,
                  world_size=world_size, device=str(device))
    train = build_loader(train_spec, split="train", batch_size=batch_size, train=True, augment=augment, drop_last=True,
                         require_labels=True, **common)
    if len(train.classes) < 2:
        raise ValueError(f"the training data has {len(train.classes)} class; a classifier needs at least 2")
    val = eval_pass(val_spec, "val", train.classes, batch_size=eval_batch_size, **common)
    seen = set(getattr(getattr(train, "source", None), "labels", range(len(train.classes))))
    unseen = sorted({train.classes[y] for y in getattr(getattr(val, "source", None), "labels", []) if y not in seen})
    if unseen and rank == 0:
        print(f"fastmae: warning: class(es) {', '.join(unseen[:10])} have validation images but no training images: "
              "they can never be predicted, so their images count as errors", file=sys.stderr)
    return train, val


def eval_pass(spec: str, split: str, classes: list[str], *, img_size: int, batch_size: int, loader: str,
              num_workers: int, seed: int, rank: int, world_size: int, device: str) -> BaseLoader:
    """An in-order pass over a labelled split with the eval transform (resize to img / 0.875, center crop), every
    sample once over the ranks (padding labelled ``IGNORE``): validation, and frozen-feature extraction."""
    from fastmae.data import build_loader

    return build_loader(spec, split=split, batch_size=batch_size, train=False, augment="eval", drop_last=False,
                        shuffle=False, classes=classes, require_labels=True, img_size=img_size, loader=loader,
                        num_workers=num_workers, seed=seed, rank=rank, world_size=world_size, device=device)
