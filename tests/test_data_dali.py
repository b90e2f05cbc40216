"""DALI loader tests on the CPU pipeline (device_id=None): semantics vs the torch loader, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from test_data_helpers import write_bad_folder, write_folder, write_tars

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, build_loader

IMG = 32


def _collect(loader, n=None):
    out = []
    for k, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n is not None and k + 1 == n:
            break
    return out


dali = pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("dfolder"), per_class=10)


@pytest.mark.parametrize("train", [True, False])
def test_dali_matches_torch_semantics(folder, train):
    """Same layout, dtype, normalization, sample order and crop windows; pixels differ only by the
    decoders' / resamplers' rounding (the crops are identical by construction)."""
    kw = dict(batch_size=8, img_size=IMG, train=train, num_workers=2, seed=4)
    d8 = _collect(build_loader(folder, loader="dali", output="uint8", **kw))
    t8 = _collect(build_loader(folder, loader="torch", output="uint8", **kw))
    df = _collect(build_loader(folder, loader="dali", output="float", **kw))
    assert len(d8) == len(t8) == 3
    mean = torch.tensor(IMAGENET_MEAN) * 255
    inv = 1 / (torch.tensor(IMAGENET_STD) * 255)
    for (xd, yd), (xt, yt), (xf, _) in zip(d8, t8, df, strict=True):
        assert xd.shape == xt.shape == (8, IMG, IMG, 3) and xd.dtype == torch.uint8
        assert yd.dtype == torch.int64 and torch.equal(yd, yt)
        assert xf.shape == (8, 3, IMG, IMG) and xf.dtype == torch.float32
        torch.testing.assert_close(xf, ((xd.float() - mean) * inv).permute(0, 3, 1, 2), rtol=0, atol=1e-6)
        diff = (xd.float() - xt.float()).abs()
        assert diff.mean() < 1.5, diff.mean()
        assert diff.flatten(1).mean(1).max() < 4.0


def test_dali_resume_equivalence(folder, tmp_path):
    kw = dict(loader="dali", batch_size=4, img_size=IMG, output="uint8", seed=9, num_workers=2)
    ref = build_loader(folder, **kw)
    ref.set_epoch(3)
    full = _collect(ref)
    ld = build_loader(folder, **kw)
    ld.set_epoch(3)
    head = _collect(ld, n=4)
    torch.save(ld.state_dict(), tmp_path / "s.pt")
    new = build_loader(folder, **{**kw, "num_workers": 1})
    new.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    tail = _collect(new)
    assert len(head) + len(tail) == len(full) == 7
    for (x1, y1), (x2, y2) in zip(full, head + tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_dali_bad_files_run_to_the_end(tmp_path):
    write_bad_folder(tmp_path / "bad")
    kw = dict(batch_size=4, img_size=IMG, output="uint8", num_workers=2, seed=1)
    ld = build_loader(tmp_path / "bad", loader="dali", **kw)
    tl = build_loader(tmp_path / "bad", loader="torch", **kw)
    for epoch in range(2):
        ld.set_epoch(epoch)
        tl.set_epoch(epoch)
        d, t = _collect(ld), _collect(tl)
        assert len(d) == ld.steps_per_epoch
        for (xd, yd), (xt, yt) in zip(d, t, strict=True):
            assert torch.equal(yd, yt)  # same substitution rule as the torch loader
            assert (xd.float() - xt.float()).abs().mean() < 3.0
    assert [p.split("/")[-1] for p, _ in ld.bad_files][-1] == "corrupt.png"
    assert [p for p, _ in ld.bad_files] == [p for p, _ in tl.bad_files]


def test_dali_webdataset_shards(folder, tmp_path):
    write_tars(folder, tmp_path / "sh", shards=2)
    kw = dict(loader="dali", batch_size=8, img_size=IMG, output="uint8", seed=2, world_size=2, rank=1)
    lt = build_loader(str(tmp_path / "sh" / "train-{000000..000001}.tar"), **kw)
    lf = build_loader(folder, **kw)
    bt, bf = _collect(lt), _collect(lf)
    assert len(bt) == lt.steps_per_epoch == 1
    for (xt, yt), (xf, yf) in zip(bt, bf, strict=True):
        assert torch.equal(xt, xf) and torch.equal(yt, yf)


def test_dali_partial_last_batch_eval(folder):
    kw = dict(batch_size=8, img_size=IMG, output="uint8", train=False, drop_last=False, num_workers=1)
    d = _collect(build_loader(folder, loader="dali", **kw))
    t = _collect(build_loader(folder, loader="torch", **kw))
    assert [len(y) for _, y in d] == [len(y) for _, y in t] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([y for _, y in d]), torch.cat([y for _, y in t]))
