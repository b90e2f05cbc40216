"""One safe way to open a user's image file: a one-line ValueError instead of a PIL traceback.

Truncated files, non-images and decompression bombs (a small file that decodes to billions of
pixels) are refused before or during decoding; the evaluation commands (``linprobe --data``,
``visualize --images``) and any other reader of user files can share it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from .text import printable

# 8K x 8K: far above any training or evaluation input, far below what exhausts host memory.
MAX_PIXELS = 8192 * 8192


def convert(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """``im.convert(mode)``, except that 16- and 32-bit integer images are scaled to 8 bits (``x >> 8``):
    PIL's own conversion clips them, so a 16-bit PNG would arrive almost all white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


def open_image(path: str | os.PathLike, mode: str = "RGB", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into a ``mode`` image, or raise ValueError naming the file and the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"{w}x{h} pixels is more than the limit of {max_pixels} (decompression bomb?)")
                im.load()
                return convert(im, mode)
    except ValueError as e:
        raise ValueError(f"cannot read image {printable(path)}: {printable(e)}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read image {printable(path)}: {printable(reason)}") from None
