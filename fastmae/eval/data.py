"""Labelled data for evaluation, held in memory as tensors.

The default is scikit-learn's ``load_digits()`` (1,797 labelled 8x8 images, shipped
inside the package, so it works offline), upsampled bilinearly to ``img_size``
and split once, stratified, with a fixed seed. A folder with one sub-folder per
class is read the same way (images resized to ``img_size``). Images come out
normalized with the training split's per-channel mean/std, which are returned
so checkpoints can record them (reconstructions need them to be displayed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    """Indices (train, test): ``round(test_fraction * n_c)`` of each class go to test (at least one if n_c > 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = min(max(int(round(test_fraction * len(idx))), 1), len(idx) - 1) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _finish(x: np.ndarray, y: np.ndarray, classes: list[str], img_size: int, in_chans: int,
            test_fraction: float, seed: int) -> LabelledSplit:
    """x: (N, C0, h, w) float in [0, 1] -> resized, channel-matched, split and normalized tensors."""
    if len(classes) < 2 or len(np.unique(y)) < 2:
        raise ValueError(f"a classification dataset needs at least 2 classes, found {len(np.unique(y))} ({classes})")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if t.shape[-2:] != (img_size, img_size):
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if t.shape[1] != in_chans:
        if t.shape[1] == 1:
            t = t.expand(-1, in_chans, -1, -1).contiguous()
        elif in_chans == 1:
            t = t.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {t.shape[1]}-channel images to {in_chans} channels")
    tr, te = stratified_split(y, test_fraction, seed)
    mean = t[tr].mean(dim=(0, 2, 3))
    std = t[tr].std(dim=(0, 2, 3)).clamp_min(1e-6)
    t = (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    yt = torch.from_numpy(y.astype(np.int64))
    return LabelledSplit(t[tr].contiguous(), yt[tr], t[te].contiguous(), yt[te], classes,
                         tuple(mean.tolist()), tuple(std.tolist()))


def load_digits_split(img_size: int = 16, in_chans: int = 1, test_fraction: float = 0.25, seed: int = 0) -> LabelledSplit:
    """scikit-learn digits (10 classes), upsampled to img_size x img_size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0)[:, None]  # (1797, 1, 8, 8), values 0..16 in the source
    return _finish(x, d.target, [str(c) for c in d.target_names], img_size, in_chans, test_fraction, seed)


def load_folder_split(root: str | Path, img_size: int, in_chans: int = 3, test_fraction: float = 0.25,
                      seed: int = 0) -> LabelledSplit:
    """``root/<class>/<image>``: every class folder is one label (sorted names)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    mode = "L" if in_chans == 1 else "RGB"
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((img_size, img_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
                xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                ys.append(label)
    if not xs:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return _finish(np.stack(xs), np.asarray(ys), classes, img_size, in_chans, test_fraction, seed)


def load_split(data: str, img_size: int, in_chans: int, test_fraction: float = 0.25, seed: int = 0) -> LabelledSplit:
    """``data='digits'`` (embedded) or a class-folder path."""
    if data == "digits":
        return load_digits_split(img_size, in_chans, test_fraction, seed)
    return load_folder_split(data, img_size, in_chans, test_fraction, seed)


def check_trainable(split: LabelledSplit, batch_size: int) -> None:
    """Clear errors for datasets a classifier cannot be trained or evaluated on."""
    n_cls = len(torch.unique(split.train_y))
    if n_cls < 2:
        raise ValueError(f"the training split has {n_cls} class; a classifier needs at least 2")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(split.train_y) < batch_size:
        raise ValueError(
            f"the training split has {len(split.train_y)} images, fewer than one batch of {batch_size} "
            f"(the last partial batch is dropped): lower batch_size or add images"
        )
    if len(split.test_y) == 0:
        raise ValueError("the held-out split is empty: each class needs at least 2 images")
