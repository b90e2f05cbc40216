"""Issue 11, item 6: hostile arguments to the model's official API and hostile image files get a one-line
ValueError naming the problem, not a silent result or a deep traceback."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import mae_vit_tiny


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mae_vit_tiny(img_size=32, patch_size=4)  # 64 patches of 4*4*3 = 48 values


@pytest.mark.parametrize(
    "pred_shape,mask_shape,match",
    [
        ((2, 64, 48), (2, 63), r"mask must have shape \(2, 64\)"),
        ((2, 64, 48), (64,), r"mask must have shape \(2, 64\)"),
        ((2, 64, 48), (1, 64), r"mask must have shape \(2, 64\)"),
        ((2, 64, 47), (2, 64), r"pred must have shape \(2, 64, 48\)"),
        ((2, 32, 48), (2, 64), r"pred must have shape \(2, 64, 48\)"),
    ],
)
def test_forward_loss_checks_shapes(model, pred_shape, mask_shape, match):
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(mask_shape)
    mask.view(-1)[::2] = 1
    with pytest.raises(ValueError, match=match):
        model.forward_loss(imgs, torch.randn(pred_shape), mask)


def test_forward_loss_matches_forward_on_good_input(model):
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), loss)


@pytest.mark.parametrize("noise", [[[0.5] * 64] * 2, np.random.rand(2, 64), 0.5])
def test_noise_must_be_a_tensor(model, noise):
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(N, L\) = \(2, 64\)"):
        model(torch.randn(2, 3, 32, 32), noise=noise)


def open_image(path):
    from fastmae.data.image_io import open_image

    return open_image(path)


def _jpeg(tmp_path, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_open_image_reads_a_good_file(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(_jpeg(tmp_path))
    im = open_image(tmp_path / "ok.jpg")
    assert im.size == (64, 48) and im.mode == "RGB"


def test_truncated_jpeg_is_one_line(tmp_path):
    data = _jpeg(tmp_path)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg: image file is truncated"):
        open_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize("side", [9000, 20000])  # under PIL's own hard limit (ours refuses it), and over it
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    # side x side one-bit pixels: a small PNG that would decode to 240 MB - 1.2 GB of RGB.
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"cannot read image .*bomb\.png: .*(decompression bomb|exceeds limit)"):
        open_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_non_images_are_one_line(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        open_image(tmp_path / "x.png")
