"""The fast CPU training-crop path: decode once, cut K random-resized crops, resize each with torch's uint8 kernel.

Same crop windows as the PIL path (:func:`fastmae.data.augment.pil_apply`), different arithmetic:

1. Decode with PIL (libjpeg-turbo). When every window of the image stays at least :data:`DRAFT_GAP` x
   ``img_size`` px on both sides after it, the JPEG is decoded DCT-scaled (PIL ``draft``: 1/2, 1/4 or
   1/8 resolution, the largest such factor), so the bicubic kernel still does the last >= 2x of the
   reduction. On ImageNet-sized photos at 224 px this never engages (a 1/2 scale needs windows of
   896 px); it pays on large originals and small outputs.
2. Copy only the window out of PIL (a dense channels-last crop is what torch's kernel is fast on).
3. Resize with ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` on uint8: torch's
   vectorized uint8 kernel (Pillow's bicubic a = -0.5 and support scaling, integer weights), no float
   round trip. Flip is a copy of the 224 x 224 result.

Tolerance against the PIL path on the same windows (``tests/test_fast_decode.py``): bit-exact where no
resampling runs (a window already of the output size, no draft); otherwise Pillow and torch differ
by at most a few levels in a few % of pixels: PSNR >= :data:`PSNR_FLOOR_RESIZE` dB; with a
DCT-scaled decode PSNR >= :data:`PSNR_FLOOR_DRAFT` dB.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["PSNR_FLOOR_RESIZE", "PSNR_FLOOR_DRAFT", "DRAFT_GAP", "decode_image", "crops_from_image", "decode_crops",
           "resize_flip"]

PSNR_FLOOR_RESIZE = 40.0
PSNR_FLOOR_DRAFT = 27.0
# libjpeg's DCT scaling filters less sharply than a bicubic antialias kernel; keeping every window at >= 2x
# the output after it (Pillow's reducing_gap idea) leaves the final 2x+ reduction to the bicubic kernel.
# Measured on the demo set (16-48 px outputs, 583 drafted crops): worst 22 dB without the gap; with it worst
# 28.1 dB, median 38 dB.
DRAFT_GAP = 2.0


def decode_image(data: bytes, windows: np.ndarray | None = None, img_size: int = 0) -> tuple[Image.Image, float]:
    """JPEG/PNG/... bytes -> (decoded RGB PIL image, scale): the image at 1/scale of its resolution.

    ``windows`` (K, >= 4) (left, top, w, h, ...) in full-resolution pixels with ``img_size`` > 0 allow a
    DCT-scaled JPEG decode that keeps every window >= DRAFT_GAP x img_size px on both sides; otherwise scale is 1."""
    im = Image.open(io.BytesIO(data))
    scale = 1.0
    if windows is not None and img_size > 0 and im.format == "JPEG":
        W, H = im.size
        cw, ch = int(windows[:, 2].min()), int(windows[:, 3].min())
        keep = DRAFT_GAP * img_size
        if cw >= 2 * keep and ch >= 2 * keep:
            drafted = im.draft("RGB", (math.ceil(W * keep / cw), math.ceil(H * keep / ch)))
            if drafted is not None:
                scale = W / drafted[1][2]
    im.load()
    return (im if im.mode == "RGB" else im.convert("RGB")), scale


def crops_from_image(im: Image.Image, windows: np.ndarray, img_size: int, scale: float = 1.0) -> torch.Tensor:
    """A decoded RGB image and K windows (left, top, w, h, flip) of the full-resolution image (``scale``: the
    decode's reduction) -> uint8 (K, img_size, img_size, 3)."""
    W, H = im.size
    out = torch.empty((len(windows), img_size, img_size, 3), dtype=torch.uint8)
    for k, (left, top, w, h, flip) in enumerate(np.asarray(windows).tolist()):
        if scale != 1.0:
            x0, y0 = round(left / scale), round(top / scale)
            x1, y1 = min(W, max(x0 + 1, round((left + w) / scale))), min(H, max(y0 + 1, round((top + h) / scale)))
        else:
            x0, y0, x1, y1 = left, top, left + w, top + h
        # Only the window leaves PIL, as one dense copy: torch's uint8 kernel is ~1.5-2x slower on a strided view,
        # and converting the whole image to an array would copy pixels no crop uses.
        with warnings.catch_warnings():  # PIL's arrays are read-only and torch warns; nothing here writes through them
            warnings.simplefilter("ignore", UserWarning)
            crop = torch.from_numpy(np.asarray(im.crop((x0, y0, x1, y1)))).permute(2, 0, 1).unsqueeze(0)
        out[k] = resize_flip(crop, img_size, flip)
    return out


def resize_flip(crop: torch.Tensor, img_size: int, flip) -> torch.Tensor:
    """uint8 (1, 3, h, w) dense crop -> (img_size, img_size, 3) view: torch's uint8 bicubic-antialias resize
    (skipped when the crop already has the output size), then the horizontal flip."""
    if crop.shape[-2:] == (img_size, img_size):
        res = crop[0].permute(1, 2, 0)
    else:
        res = F.interpolate(crop, size=(img_size, img_size), mode="bicubic", antialias=True)[0].permute(1, 2, 0)
    return res.flip(1) if flip else res


def decode_crops(data: bytes, windows, img_size: int, draft: bool = True) -> torch.Tensor:
    """Encoded image + K train windows (left, top, w, h, flip) -> uint8 (K, img_size, img_size, 3), one decode."""
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 5)
    im, scale = decode_image(data, windows if draft else None, img_size)
    return crops_from_image(im, windows, img_size, scale)
