"""The fast training-crop path (fastmae.data.decode) against the PIL path on the same crop windows.

Stated tolerance: bit-exact where no resampling runs; PSNR >= 40 dB where torch's uint8 bicubic-antialias
kernel replaces Pillow's; PSNR >= 27 dB with a DCT-scaled (draft) JPEG decode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import build_loader
from fastmae.data.augment import pil_apply, train_params_batch
from fastmae.data.decode import PSNR_FLOOR_DRAFT, PSNR_FLOOR_RESIZE, decode_crops, decode_image
from fastmae.data.demo import sample_photos


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg(arr: np.ndarray, size: tuple[int, int], quality: int = 90, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def reference(data: bytes, window, img_size: int) -> np.ndarray:
    """Today's PIL path: full decode, crop, Pillow bicubic, flip."""
    with Image.open(io.BytesIO(data)) as im:
        return pil_apply(im, img_size, True, window)


@pytest.fixture(scope="module")
def photos():
    return list(sample_photos().values())[:6]


def test_window_of_output_size_is_bit_exact(photos):
    data = jpeg(photos[0], (500, 375))
    for window in ([10, 20, 224, 224, 0], [250, 100, 224, 224, 1]):
        got = decode_crops(data, [window], 224)[0].numpy()
        assert np.array_equal(got, reference(data, window, 224))


def test_imagenet_like_windows_within_psnr_floor(photos):
    worst = float("inf")
    for i, p in enumerate(photos):
        data = jpeg(p, (500, 375))
        windows = train_params_batch(0, 3, np.arange(8) + 8 * i, [500] * 8, [375] * 8)
        got = decode_crops(data, windows, 224)  # one decode, eight crops
        for k, window in enumerate(windows.tolist()):
            ref = reference(data, window, 224)
            assert np.abs(got[k].numpy().astype(int) - ref).max() <= 8
            worst = min(worst, psnr(got[k].numpy(), ref))
    assert worst >= PSNR_FLOOR_RESIZE, worst


def test_dct_scaled_decode_engages_only_when_every_window_allows_and_stays_within_floor(photos):
    data = jpeg(photos[1], (1600, 1200))
    big = np.array([[100, 80, 1000, 900, 0], [400, 200, 1150, 980, 1]])
    img, scale = decode_image(data, big, 112)
    assert scale == 4.0 and img.size == (400, 300)  # 900/4 = 225 >= 2 x 112; 1/8 would give 112
    assert decode_image(data, big, 224)[1] == 2.0
    assert decode_image(data, np.array([[0, 0, 1000, 900, 0], [0, 0, 300, 300, 0]]), 112)[1] == 1.0
    assert decode_image(data, big, 300)[1] == 1.0  # 900/2 < 2 x 300: the bicubic kernel does it all
    got = decode_crops(data, big, 112)
    for k, window in enumerate(big.tolist()):
        assert psnr(got[k].numpy(), reference(data, window, 112)) >= PSNR_FLOOR_DRAFT
    full = decode_crops(data, big, 112, draft=False)
    for k, window in enumerate(big.tolist()):
        assert psnr(full[k].numpy(), reference(data, window, 112)) >= PSNR_FLOOR_RESIZE


def test_grayscale_and_png_sources(photos):
    gray = jpeg(photos[2], (300, 200), mode="L")
    window = [20, 10, 150, 120, 1]
    assert psnr(decode_crops(gray, [window], 64)[0].numpy(), reference(gray, window, 64)) >= PSNR_FLOOR_RESIZE
    buf = io.BytesIO()
    Image.fromarray(photos[3]).resize((300, 200)).save(buf, "PNG")
    png = buf.getvalue()
    assert psnr(decode_crops(png, [window], 64)[0].numpy(), reference(png, window, 64)) >= PSNR_FLOOR_RESIZE


def test_loader_fast_decode_matches_pil_loader_within_floor(demo_dir):
    kw = dict(batch_size=8, img_size=48, output="uint8", num_workers=0, seed=3)
    fast = build_loader(demo_dir, decode="fast", **kw)
    pil = build_loader(demo_dir, decode="pil", **kw)
    (xf, yf), (xp, yp) = next(iter(fast)), next(iter(pil))
    assert torch.equal(yf, yp) and xf.shape == xp.shape == (8, 48, 48, 3)
    assert not torch.equal(xf, xp)  # the fast path really ran
    for a, b in zip(xf.numpy(), xp.numpy(), strict=True):
        assert psnr(a, b) >= PSNR_FLOOR_DRAFT  # demo crops up to 256 px at 48 px out: some are DCT-scaled
    with pytest.raises(ValueError, match="decode must be one of"):
        build_loader(demo_dir, decode="turbo", **kw)
