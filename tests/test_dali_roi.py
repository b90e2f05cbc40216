"""``decode="dali_roi"`` (DALI CPU ROI decode in the torch loader's workers + torch's uint8 resize) against the
independent paths on the same crop windows.

Stated tolerance: bit-exact against the ``fast`` path without DCT scaling (the same libjpeg-turbo pixels, the same
torch resampler); against today's PIL path (Pillow's resampler) PSNR >= ``PSNR_FLOOR_RESIZE`` (40 dB).
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import write_bad_folder, write_folder
from test_fast_decode import jpeg, psnr, reference

from fastmae.config import parse_overrides
from fastmae.data import build_loader
from fastmae.data.augment import train_params_batch
from fastmae.data.decode import PSNR_FLOOR_RESIZE, decode_crops
from fastmae.data.demo import sample_photos

pytest.importorskip("nvidia.dali")

from fastmae.data.dali_roi import RoiDataset, RoiDecoder  # noqa: E402


def test_roi_decode_of_imagenet_like_windows_matches_pil_decode_bit_for_bit_and_pil_resize_within_floor():
    photos = list(sample_photos().values())[:4]
    datas = [jpeg(p, (500, 375)) for p in photos]
    windows = train_params_batch(0, 2, np.arange(len(datas)), [500] * len(datas), [375] * len(datas))
    crops = RoiDecoder(8)(datas, windows)
    worst = float("inf")
    for data, window, crop in zip(datas, windows.tolist(), crops, strict=True):
        left, top, w, h, flip = window
        with Image.open(io.BytesIO(data)) as im:  # the ROI decode is PIL's full decode cut to the window, bit for bit
            assert np.array_equal(crop, np.asarray(im.convert("RGB").crop((left, top, left + w, top + h))))
        got = torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None], size=(224, 224),
                                              mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
        got = got[:, ::-1] if flip else got
        assert np.array_equal(got, decode_crops(data, [window], 224, draft=False)[0].numpy())
        worst = min(worst, psnr(got, reference(data, window, 224)))
    assert worst >= PSNR_FLOOR_RESIZE, worst


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_equals_fast_path_and_substitutes_bad_files_like_it(tmp_path, workers):
    """Gray, CMYK, PNG, RGBA, smaller-than-crop and a file that passes the scan but fails to decode: the same
    labels, substitutions and (at 64 px, where the fast path never DCT-scales these small files) pixels."""
    write_bad_folder(tmp_path / "bad")
    kw = dict(batch_size=4, img_size=64, output="uint8", seed=1)
    roi = build_loader(tmp_path / "bad", decode="dali_roi", num_workers=workers, **kw)
    fast = build_loader(tmp_path / "bad", decode="fast", num_workers=0, **kw)
    pil = build_loader(tmp_path / "bad", decode="pil", num_workers=0, **kw)
    assert isinstance(roi.dataset, RoiDataset)
    for epoch in range(2):
        for ld in (roi, fast, pil):
            ld.set_epoch(epoch)
        for (xr, yr), (xf, yf), (xp, _) in zip(roi, fast, pil, strict=True):
            assert torch.equal(yr, yf) and torch.equal(xr, xf)
            assert (xr.int() - xp.int()).abs().max() <= 8
    assert [p for p, _ in roi.bad_files] == [p for p, _ in fast.bad_files]
    assert roi.bad_files[-1][0].endswith("corrupt.png") and "\n" not in roi.bad_files[-1][1]


def test_dataset_pickles_without_its_pipeline(tmp_path):
    from fastmae.data.sources import open_source

    src = open_source(write_folder(tmp_path / "f", per_class=2), "train", warn=False)
    ds = RoiDataset(src, 32, "mae", 0, 4)
    keys = ds.batch_keys(0, np.arange(4))
    first = ds.__getitems__(keys)
    assert ds._decoder is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a forkserver / spawn worker receives
    assert clone._decoder is None
    for (a, la, _), (b, lb, _) in zip(first, clone.__getitems__(keys), strict=True):
        assert np.array_equal(a, b) and la == lb


def test_eval_loader_with_dali_roi_takes_the_pil_path(tmp_path):
    root = write_folder(tmp_path / "f", per_class=2)
    ev = build_loader(root, decode="dali_roi", train=False, batch_size=4, img_size=32, output="uint8", num_workers=0)
    assert not isinstance(ev.dataset, RoiDataset)


def test_bad_combinations_are_refused_with_one_line(tmp_path):
    root = write_folder(tmp_path / "f", per_class=2)
    with pytest.raises(ValueError, match="torch-loader decode without repeat_samples"):
        build_loader(root, decode="dali_roi", repeat_samples=2, batch_size=4, img_size=32)
    with pytest.raises(ValueError, match="torch-loader decode without repeat_samples"):
        parse_overrides(["--decode=dali_roi", "--repeat_samples=2"])
    assert parse_overrides(["--decode=dali_roi"]).data.decode == "dali_roi"
