"""Augmentation geometry, shared by every loader.

All randomness is a pure function of ``(seed, epoch, sample index)``: each sample gets its own
generator, so crops and flips do not depend on worker count, batch composition or where a run was
resumed. The crop windows are drawn on the host and handed to the decoder (PIL here, DALI's ROI decode
in ``dali.py``), so both loaders cut exactly the same pixels out of the same file.

Train (official MAE): random-resized-crop with scale (0.2, 1), log-uniform aspect ratio (3/4, 4/3),
ten attempts then a center-crop fallback (torchvision's algorithm); bicubic resize to ``img_size``;
horizontal flip with p = 0.5. Eval: resize the short side to ``int(img_size / 0.875)`` (256 for 224,
bicubic) then center crop ``img_size``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_PCT = 0.875
_AUG_STREAM = 0x41554721
_PERM_STREAM = 0x5045524D

__all__ = ["sample_rng", "epoch_permutation", "rrc_params", "train_params", "eval_params", "pil_apply"]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), int(epoch), int(index), _AUG_STREAM))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((int(seed), int(epoch), _PERM_STREAM)).permutation(n)


def rrc_params(rng: np.random.Generator, width: int, height: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """-> (left, top, w, h) of a random-resized-crop window inside a width x height image."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest central window whose aspect ratio lies in the allowed range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_params(seed: int, epoch: int, index: int, width: int, height: int) -> tuple[int, int, int, int, int]:
    """-> (left, top, w, h, flip) for sample ``index`` of ``epoch``."""
    rng = sample_rng(seed, epoch, index)
    left, top, w, h = rrc_params(rng, width, height)
    flip = int(rng.random() < 0.5)
    return left, top, w, h, flip


def eval_params(width: int, height: int, img_size: int) -> tuple[int, int, int, int]:
    """-> (resize_w, resize_h, left, top): short side to int(img_size / 0.875), then center crop."""
    short = int(img_size / EVAL_CROP_PCT)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    left = int(round((rw - img_size) / 2.0))
    top = int(round((rh - img_size) / 2.0))
    return rw, rh, left, top


def pil_apply(im: Image.Image, img_size: int, train: bool, params) -> np.ndarray:
    """Decode-side transform for the PIL loader. -> uint8 (img_size, img_size, 3)."""
    if im.mode != "RGB":
        im = im.convert("RGB")
    if train:
        left, top, w, h, flip = params
        im = im.crop((left, top, left + w, top + h)).resize((img_size, img_size), Image.BICUBIC)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        rw, rh, left, top = params
        im = im.resize((rw, rh), Image.BICUBIC).crop((left, top, left + img_size, top + img_size))
    return np.asarray(im, dtype=np.uint8)
