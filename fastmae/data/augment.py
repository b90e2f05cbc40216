"""Augmentation geometry, shared by every loader.

All randomness is a pure function of ``(seed, epoch, sample index)``: every draw is a counter-based
hash of ``(seed, epoch, index, draw number)`` (:func:`sample_uniforms`), so crops and flips do not
depend on worker count, batch composition or where a run was resumed, and a whole batch's windows are
computed in a few vectorized numpy operations (the DALI feed) or one sample at a time (torch workers)
with identical results. The crop windows are handed to the decoder (PIL here, DALI's ROI decode in
``dali.py``), so both loaders cut exactly the same pixels out of the same file.

Train (official MAE): random-resized-crop with scale (0.2, 1) (``"linprobe"``: (0.08, 1)), log-uniform
aspect ratio (3/4, 4/3), ten attempts then a center-crop fallback (torchvision's algorithm); bicubic
resize to ``img_size``; horizontal flip with p = 0.5. Eval: resize the short side to
``int(img_size / 0.875)`` (256 for 224, bicubic) then center crop ``img_size``.

The MAE paper's pretraining augmentation table (Table 1e) as ``augment`` values: ``"none"`` (the eval
geometry), ``"crop"`` (a fixed-size window, the eval crop's share 0.875 of the short side, at a random
position, + flip: :func:`fixed_crop_params_batch`), ``"crop_flip"`` (= ``"mae"``), ``"crop_color"``
(``"mae"`` + :func:`color_jitter` on the decoded crop, torch loader only).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .image_io import convert

SCALE = (0.2, 1.0)
# The random-resized-crop scale range of each crop-based augmentation (build_loader's ``augment``).
AUGMENT_SCALES = {"mae": SCALE, "linprobe": (0.08, 1.0), "crop_flip": SCALE, "crop_color": SCALE}
RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_PCT = 0.875
ATTEMPTS = 10
FLIP_DRAW = 4 * ATTEMPTS  # draws 0..39: (area, log-ratio, top, left) per attempt; 40: flip; 41+: free
COLOR_DRAW = FLIP_DRAW + 1  # draws 41..43: brightness, contrast, saturation factors of "crop_color"
COLOR_JITTER = 0.4  # each factor uniform in [1 - 0.4, 1 + 0.4] (torchvision ColorJitter(0.4, 0.4, 0.4))
_PERM_STREAM = 0x5045524D
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

__all__ = [
    "AUGMENT_SCALES",
    "sample_uniforms",
    "sample_seed",
    "epoch_permutation",
    "rrc_windows",
    "train_params",
    "train_params_batch",
    "fixed_crop_params_batch",
    "color_jitter",
    "eval_params",
    "pil_apply",
]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _sample_keys(seed: int, epoch: int, indices) -> np.ndarray:
    key = _mix(np.array([int(seed) & _MASK64], np.uint64) + _GOLDEN)
    key = _mix(key ^ np.array([int(epoch) & _MASK64], np.uint64))
    return _mix(key ^ (np.asarray(indices, np.int64).reshape(-1).astype(np.uint64) * _GOLDEN))


def sample_uniforms(seed: int, epoch: int, indices, n: int) -> np.ndarray:
    """-> float64 (len(indices), n) in [0, 1): draw k of sample i, a pure function of (seed, epoch, i, k)."""
    x = _mix(_sample_keys(seed, epoch, indices)[:, None] + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for third-party RNGs (python ``random``, torch) for one sample."""
    return int(_mix(_sample_keys(seed, epoch, [index]) ^ np.uint64(0x5EED))[0] >> np.uint64(1))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((int(seed), int(epoch), _PERM_STREAM)).permutation(n)


def rrc_windows(u: np.ndarray, widths, heights, scale=SCALE, ratio=RATIO) -> np.ndarray:
    """Random-resized-crop windows. u: (N, >= 40) uniforms; widths, heights: (N,) -> int64 (N, 4)
    (left, top, w, h): the first of ten attempts that fits, else the largest central window whose
    aspect ratio lies in ``ratio``."""
    W = np.asarray(widths, np.int64).reshape(-1)
    H = np.asarray(heights, np.int64).reshape(-1)
    n = len(W)
    area = (W * H).astype(np.float64)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:FLIP_DRAW:4])
    ar = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:FLIP_DRAW:4])
    w = np.rint(np.sqrt(target * ar)).astype(np.int64)
    h = np.rint(np.sqrt(target / ar)).astype(np.int64)
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    k = fits.argmax(1)
    rows = np.arange(n)
    cw, ch = w[rows, k], h[rows, k]
    top = np.floor(u[rows, 4 * k + 2] * (H - ch + 1)).astype(np.int64)
    left = np.floor(u[rows, 4 * k + 3] * (W - cw + 1)).astype(np.int64)
    out = np.stack([left, top, cw, ch], 1)
    miss = ~fits.any(1)
    if miss.any():
        fw, fh = W[miss], H[miss]
        in_ratio = fw / fh
        lo, hi = min(ratio), max(ratio)
        fbw = np.where(in_ratio < lo, fw, np.where(in_ratio > hi, np.rint(fh * hi).astype(np.int64), fw))
        fbh = np.where(in_ratio < lo, np.rint(fw / lo).astype(np.int64), fh)
        out[miss] = np.stack([(fw - fbw) // 2, (fh - fbh) // 2, fbw, fbh], 1)
    return out


def train_params_batch(seed: int, epoch: int, indices, widths, heights, scale=SCALE) -> np.ndarray:
    """-> int64 (N, 5): (left, top, w, h, flip) of samples ``indices`` of ``epoch`` on their image sizes."""
    u = sample_uniforms(seed, epoch, indices, FLIP_DRAW + 1)
    flip = (u[:, FLIP_DRAW] < 0.5).astype(np.int64)
    return np.concatenate([rrc_windows(u, widths, heights, scale), flip[:, None]], 1)


def train_params(seed: int, epoch: int, index: int, width: int, height: int, scale=SCALE) -> tuple[int, int, int, int, int]:
    """-> (left, top, w, h, flip) for sample ``index`` of ``epoch`` (one row of :func:`train_params_batch`)."""
    return tuple(int(v) for v in train_params_batch(seed, epoch, [index], [width], [height], scale)[0])


def fixed_crop_params_batch(seed: int, epoch: int, indices, widths, heights) -> np.ndarray:
    """-> int64 (N, 5) (left, top, w, h, flip): a square window of side int(0.875 * short side) at a uniform
    position (draws 2 and 3), flipped with p = 0.5 (the flip draw): ``augment="crop"``."""
    u = sample_uniforms(seed, epoch, indices, FLIP_DRAW + 1)
    W = np.asarray(widths, np.int64).reshape(-1)
    H = np.asarray(heights, np.int64).reshape(-1)
    side = np.maximum(1, (np.minimum(W, H) * EVAL_CROP_PCT).astype(np.int64))
    top = np.floor(u[:, 2] * (H - side + 1)).astype(np.int64)
    left = np.floor(u[:, 3] * (W - side + 1)).astype(np.int64)
    flip = (u[:, FLIP_DRAW] < 0.5).astype(np.int64)
    return np.stack([left, top, side, side, flip], 1)


def color_jitter(img: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
    """Brightness, then contrast (about the mean gray), then saturation (about each pixel's gray), factors
    from draws 41..43 of the sample; uint8 (H, W, 3) -> uint8 (H, W, 3), rounded to nearest."""
    b, c, s = 1.0 + COLOR_JITTER * (2.0 * sample_uniforms(seed, epoch, [index], COLOR_DRAW + 3)[0, COLOR_DRAW:] - 1.0)
    gray_w = np.array([0.299, 0.587, 0.114])
    x = img.astype(np.float64) * b
    m = (x @ gray_w).mean()
    x = (x - m) * c + m
    g = (x @ gray_w)[..., None]
    x = (x - g) * s + g
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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
    """Decode-side transform for the PIL loader. params: (left, top, w, h, flip) of a crop when ``train``
    (:func:`train_params`), else (resize_w, resize_h, left, top) (:func:`eval_params`).
    -> uint8 (img_size, img_size, 3)."""
    im = convert(im, "RGB")  # 16-bit images scaled, not clipped
    if train:
        left, top, w, h, flip = params
        im = im.crop((left, top, left + w, top + h)).resize((img_size, img_size), Image.BICUBIC)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        rw, rh, left, top = params
        im = im.resize((rw, rh), Image.BICUBIC).crop((left, top, left + img_size, top + img_size))
    return np.asarray(im, dtype=np.uint8)
