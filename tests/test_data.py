"""Data pipeline tests (torch/PIL loader, sources, sharding, resume, bad input, demo set, check CLI)."""

from __future__ import annotations

import io
import sys
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from test_data_helpers import write_bad_folder, write_folder, write_tars

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, build_loader, prepare_demo_dataset
from fastmae.data.augment import rrc_windows, sample_uniforms, train_params, train_params_batch
from fastmae.data.check import main as check_main
from fastmae.data.loader import rank_indices
from fastmae.data.sources import expand_braces, open_source

IMG = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"), per_class=10)


def collect(loader, n=None):
    out = []
    for k, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n is not None and k + 1 == n:
            break
    return out


def manual_normalize(u8: torch.Tensor) -> torch.Tensor:
    mean = np.asarray(IMAGENET_MEAN, np.float32) * np.float32(255)
    inv = np.float32(1) / (np.asarray(IMAGENET_STD, np.float32) * np.float32(255))
    x = (u8.numpy().astype(np.float32) - mean) * inv
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("train", [True, False])
def test_shapes_dtypes_ranges(folder, train):
    kw = dict(batch_size=8, img_size=IMG, num_workers=0, train=train)
    u8 = build_loader(folder, output="uint8", **kw)
    fl = build_loader(folder, output="float", **kw)
    assert u8.steps_per_epoch == 30 // 8 == len(u8)
    assert u8.num_classes == 3 and u8.classes == ["class0", "class1", "class2"] and u8.num_samples == 30
    bu, bf = collect(u8), collect(fl)
    assert len(bu) == u8.steps_per_epoch
    for (xu, yu), (xf, yf) in zip(bu, bf, strict=True):
        assert xu.shape == (8, IMG, IMG, 3) and xu.dtype == torch.uint8
        assert xf.shape == (8, 3, IMG, IMG) and xf.dtype == torch.float32 and xf.is_contiguous()
        assert yu.dtype == torch.int64 and yu.shape == (8,) and 0 <= int(yu.min()) and int(yu.max()) < 3
        assert torch.equal(yu, yf)
        torch.testing.assert_close(xf, manual_normalize(xu), rtol=0, atol=1e-6)
        assert int(xu.max()) > int(xu.min())


def test_pixels_match_torchvision_crop(folder):
    """The loader's output for a sample equals torchvision's resized_crop + hflip with our window."""
    ld = build_loader(folder, batch_size=4, img_size=IMG, num_workers=0, output="uint8", seed=3)
    ld.set_epoch(2)
    x, _ = next(iter(ld))
    src = ld.dataset.src
    for k, idx in enumerate(ld.epoch_indices(2)[:4].tolist()):
        im = Image.open(src.locs[idx]).convert("RGB")
        left, top, w, h, flip = train_params(3, 2, idx, *im.size)
        ref = TF.resized_crop(im, top, left, h, w, [IMG, IMG], interpolation=TF.InterpolationMode.BICUBIC)
        ref = TF.hflip(ref) if flip else ref
        assert np.array_equal(x[k].numpy(), np.asarray(ref))


def test_eval_matches_torchvision_resize_center_crop(folder):
    ld = build_loader(folder, batch_size=4, img_size=IMG, num_workers=0, output="uint8", train=False)
    x, _ = next(iter(ld))
    for k in range(4):
        im = Image.open(ld.dataset.src.locs[k]).convert("RGB")
        ref = TF.center_crop(TF.resize(im, int(IMG / 0.875), TF.InterpolationMode.BICUBIC), IMG)
        assert np.array_equal(x[k].numpy(), np.asarray(ref))


def test_determinism_and_worker_independence(folder):
    kw = dict(batch_size=8, img_size=IMG, output="uint8", seed=7)
    a = collect(build_loader(folder, num_workers=0, **kw))
    b = collect(build_loader(folder, num_workers=2, **kw))
    c = collect(build_loader(folder, num_workers=0, **{**kw, "seed": 8}))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    ld = build_loader(folder, num_workers=0, **kw)
    e0 = collect(ld)
    e1 = collect(ld)  # exhausted epoch -> iterating again moves to epoch 1 (new order, new crops)
    assert ld.state_dict()["epoch"] == 1
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    assert torch.equal(e0[0][0], a[0][0])


def test_augmentation_statistics():
    """Crop scale within (0.2, 1), aspect ratio within (3/4, 4/3), flip rate ~0.5, and the scale
    distribution agrees with torchvision's RandomResizedCrop on the same image size."""
    W, H, n = 500, 375, 4000
    p = np.array([train_params(0, 0, i, W, H) for i in range(n)])
    scale = p[:, 2] * p[:, 3] / (W * H)
    ratio = p[:, 2] / p[:, 3]
    assert scale.min() > 0.19 and scale.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    assert (p[:, 0] >= 0).all() and (p[:, 0] + p[:, 2] <= W).all() and (p[:, 1] + p[:, 3] <= H).all()
    assert abs(p[:, 4].mean() - 0.5) < 0.03
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    tv = np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    tv_scale = tv[:, 2] * tv[:, 3] / (W * H)
    assert abs(scale.mean() - tv_scale.mean()) < 0.02
    assert abs(np.median(scale) - np.median(tv_scale)) < 0.03
    # The fallback (no window fits in ten tries) still returns an in-range window.
    left, top, w, h = rrc_windows(sample_uniforms(0, 0, [0], 40), [1000], [10])[0]
    assert 0 <= left and left + w <= 1000 and h == 10 and abs(w / h - 4 / 3) < 0.1
    # One vectorized call over a batch gives exactly the per-sample windows, whatever the batch.
    idx = np.array([7, 3, 3000, 11])
    wh = np.array([[500, 375], [40, 1000], [1000, 10], [64, 64]])
    batch = train_params_batch(0, 2, idx, wh[:, 0], wh[:, 1])
    assert [tuple(r) for r in batch.tolist()] == [train_params(0, 2, i, w, h) for i, (w, h) in zip(idx, wh, strict=True)]
    assert np.array_equal(train_params_batch(0, 2, idx[::-1], wh[::-1, 0], wh[::-1, 1]), batch[::-1])


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_rank_sharding_disjoint_and_complete(drop_last):
    n, bs, ws = 103, 8, 2
    per = [
        rank_indices(n, epoch=3, seed=1, shuffle=True, rank=r, world_size=ws, batch_size=bs, drop_last=drop_last)
        for r in range(ws)
    ]
    assert len(per[0]) == len(per[1])
    if drop_last:
        assert len(per[0]) == (n // ws) // bs * bs
        assert not set(per[0].tolist()) & set(per[1].tolist())
        kept = np.concatenate(per)
        assert len(set(kept.tolist())) == len(kept)
        # complete: the union of what the ranks could visit (before the per-rank partial batch is
        # dropped) is the whole data set except the n % world_size remainder
        full = [
            rank_indices(n, epoch=3, seed=1, shuffle=True, rank=r, world_size=ws, batch_size=1, drop_last=True) for r in range(ws)
        ]
        assert len(set(np.concatenate(full).tolist())) == n - n % ws
    else:
        assert set(np.concatenate(per).tolist()) == set(range(n))
    other = rank_indices(n, epoch=4, seed=1, shuffle=True, rank=0, world_size=ws, batch_size=bs, drop_last=drop_last)
    assert not np.array_equal(other, per[0])


def test_two_rank_loaders(folder):
    kw = dict(batch_size=4, img_size=IMG, num_workers=0, output="uint8", world_size=2)
    r0 = build_loader(folder, rank=0, **kw)
    r1 = build_loader(folder, rank=1, **kw)
    assert r0.steps_per_epoch == r1.steps_per_epoch == 15 // 4
    i0, i1 = set(r0.epoch_indices(0).tolist()), set(r1.epoch_indices(0).tolist())
    assert not i0 & i1 and len(i0) == len(i1) == 12
    b0, b1 = collect(r0), collect(r1)
    assert len(b0) == len(b1) == 3


def test_drop_last_false_partial_batch(folder):
    ld = build_loader(folder, batch_size=8, img_size=IMG, num_workers=0, drop_last=False, output="uint8")
    b = collect(ld)
    assert ld.steps_per_epoch == 4 and [len(y) for _, y in b] == [8, 8, 8, 6]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equivalence_torch(folder, workers, tmp_path):
    kw = dict(batch_size=4, img_size=IMG, output="uint8", seed=5)
    ref = build_loader(folder, num_workers=0, **kw)
    ref.set_epoch(1)
    full = collect(ref)
    assert ref.state_dict()["step"] == ref.steps_per_epoch == 7

    ld = build_loader(folder, num_workers=workers, **kw)
    ld.set_epoch(1)
    head = collect(ld, n=3)
    sd = ld.state_dict()
    assert (sd["epoch"], sd["step"]) == (1, 3)
    torch.save({"loader": sd}, tmp_path / "ck.pt")
    sd2 = torch.load(tmp_path / "ck.pt", weights_only=True)["loader"]

    new = build_loader(folder, num_workers=workers, **kw)
    new.load_state_dict(sd2)
    new.set_epoch(1)  # engine calls set_epoch at each epoch start: must keep the restored step
    tail = collect(new)
    got = head + tail
    assert len(got) == len(full)
    for (x1, y1), (x2, y2) in zip(full, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert new.state_dict()["step"] == 7
    new.set_epoch(2)
    assert new.state_dict()["step"] == 0


def test_load_state_dict_rejects_other_config(folder):
    a = build_loader(folder, batch_size=4, img_size=IMG, num_workers=0)
    b = build_loader(folder, batch_size=5, img_size=IMG, num_workers=0)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_bad_files_skipped_counted_reported(tmp_path, capsys):
    kinds = write_bad_folder(tmp_path / "bad")
    ld = build_loader(tmp_path / "bad", batch_size=4, img_size=IMG, num_workers=2, output="uint8")
    scan_bad = {p.split("/")[-1] for p, _ in ld.dataset.src.bad}
    assert scan_bad == {k for k, v in kinds.items() if v == "bad"}
    assert ld.dataset.src.empty_classes == ["empty_class"]
    assert ld.num_classes == 4  # the empty class keeps its id
    n_ok = 18 + sum(v != "bad" for v in kinds.values())
    assert ld.num_samples == n_ok
    for epoch in range(2):
        ld.set_epoch(epoch)
        batches = collect(ld)
        assert len(batches) == ld.steps_per_epoch == n_ok // 4
        assert all(x.shape == (4, IMG, IMG, 3) for x, _ in batches)
    # the corrupt PNG passes the scan, fails at decode, and is substituted + reported
    visited = {ld.dataset.src.names[i].split("/")[-1] for e in range(2) for i in ld.epoch_indices(e).tolist()}
    assert "corrupt.png" in visited
    reported = [p.split("/")[-1] for p, _ in ld.bad_files]
    assert sorted(reported[:-1]) == sorted(scan_bad) and reported[-1] == "corrupt.png"
    assert ld.bad_count >= 1

    rc = check_main([str(tmp_path / "bad"), "--img-size", str(IMG)])
    out = capsys.readouterr().out
    assert rc == 1
    for name, kind in kinds.items():
        if kind == "bad":
            assert name in out
    assert "EMPTY class folder: empty_class" in out
    assert "FOUND" in out
    rc = check_main([str(tmp_path / "bad"), "--deep", "--img-size", str(IMG)])
    assert rc == 1 and "corrupt.png" in capsys.readouterr().out


def test_check_clean_dataset(folder, capsys):
    assert check_main([str(folder), "--img-size", str(IMG)]) == 0
    assert "OK: no problems found" in capsys.readouterr().out
    assert check_main([str(folder / "nope")]) == 2


def test_runtime_substitution_is_deterministic(tmp_path):
    """A file that fails only at decode is replaced by the next good index, with the original's crop stream."""
    root = write_folder(tmp_path / "d", per_class=4)
    from test_data_helpers import corrupt_png_bytes, photos

    (root / "class0" / "000b.png").write_bytes(corrupt_png_bytes(photos()[0][:60, :60]))
    kw = dict(batch_size=13, img_size=IMG, output="uint8", train=False, shuffle=False)
    ld = build_loader(root, num_workers=0, **kw)
    ((x, y),) = collect(ld)
    names = [n.split("/")[-1] for n in ld.dataset.src.names]
    k = names.index("000b.png")
    # An evaluation loader's stand-in keeps the batch shape but is never scored: it carries the ignore label.
    assert torch.equal(x[k], x[k + 1]) and int(y[k]) == -1 and int(y[k + 1]) >= 0
    assert [p.split("/")[-1] for p, _ in ld.bad_files] == ["000b.png"]


def test_missing_and_empty_inputs_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_loader(tmp_path / "missing", batch_size=2, img_size=IMG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_loader(tmp_path / "empty", batch_size=2, img_size=IMG)
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no usable images"):
        build_loader(tmp_path / "junk", batch_size=2, img_size=IMG)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        build_loader(str(tmp_path / "shards-{000000..000003}.tar"), batch_size=2, img_size=IMG)
    with pytest.raises(ValueError, match="loader must be"):
        build_loader(tmp_path, batch_size=2, img_size=IMG, loader="nvjpeg")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tmp_path, batch_size=0, img_size=IMG)
    with pytest.raises(ValueError, match="rank"):
        build_loader(tmp_path, batch_size=2, img_size=IMG, rank=2, world_size=2)


def test_too_few_samples_for_a_batch(folder):
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(folder, batch_size=16, img_size=IMG, world_size=2)


def test_brace_expansion():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s{8..10}") == ["x/s8", "x/s9", "x/s10", "y/s8", "y/s9", "y/s10"]


def test_webdataset_shards_match_folder(folder, tmp_path):
    tars = write_tars(folder, tmp_path / "shards", shards=3)
    spec = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    kw = dict(batch_size=4, img_size=IMG, output="uint8", seed=2, num_workers=0)
    lt = build_loader(spec, **kw)
    lf = build_loader(folder, **kw)
    assert lt.num_samples == lf.num_samples == 30 and lt.classes == ["0", "1", "2"]
    for (xt, yt), (xf, yf) in zip(collect(lt), collect(lf), strict=True):
        assert torch.equal(xt, xf) and torch.equal(yt, yf)
    assert build_loader(str(tmp_path / "shards" / "*.tar"), **kw).num_samples == 30
    assert build_loader(tmp_path / "shards", **kw).num_samples == 30  # a directory of tars
    tars[1].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        build_loader(spec, **kw)


def test_webdataset_bad_members(tmp_path):
    import tarfile

    tp = tmp_path / "s.tar"
    good = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, format="JPEG")
    with tarfile.open(tp, "w") as tf:
        for name, data in (
            ("a.jpg", good.getvalue()),
            ("a.cls", b"1"),
            ("b.jpg", good.getvalue()[:-40]),
            ("c.txt", b"caption only"),
            ("d.jpg", good.getvalue()),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    src = open_source(str(tp), warn=False)
    assert len(src) == 2 and src.labels == [1, -1]
    assert sorted(r.split(" ")[0] for _, r in src.bad) == ["no", "truncated"]


def test_synthetic_loader():
    ld = build_loader(None, loader="synthetic", batch_size=4, img_size=IMG, num_samples=40, output="float")
    b = collect(ld)
    assert ld.steps_per_epoch == len(b) == 10
    x, y = b[0]
    assert x.shape == (4, 3, IMG, IMG) and x.dtype == torch.float32 and y.dtype == torch.int64
    u = build_loader(None, loader="synthetic", batch_size=4, img_size=IMG, output="uint8")
    assert next(iter(u))[0].dtype == torch.uint8 and u.steps_per_epoch == 256


def test_demo_dataset_builds_once_and_concurrently(tmp_path):
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(prepare_demo_dataset(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(roots) == 2 and roots[0] == roots[1]
    root = roots[0]
    train = sorted((root / "train").rglob("*.jpg"))
    val = sorted((root / "val").rglob("*.jpg"))
    assert 200 <= len(train) <= 600 and 30 <= len(val) <= 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-tmp")]
    mtime = train[0].stat().st_mtime_ns
    assert prepare_demo_dataset(tmp_path) == root and train[0].stat().st_mtime_ns == mtime
    sizes = [Image.open(p).size for p in train[::7]]
    assert all(40 <= min(s) and max(s) <= 300 for s in sizes)
    trn = build_loader(root, batch_size=16, img_size=IMG, num_workers=0)
    val_ld = build_loader(root, split="val", batch_size=8, img_size=IMG, train=False, num_workers=0)
    assert trn.classes == val_ld.classes and trn.num_classes >= 8
    assert trn.dataset.src.bad == [] and val_ld.dataset.src.bad == []


def test_missing_dali_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"fastmae\[dali\]"):
        build_loader(folder, loader="dali", batch_size=2, img_size=IMG)


def test_jpeg_with_trailer_after_end_marker_is_kept(tmp_path):
    d = tmp_path / "t" / "c"
    d.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 10, 10)).save(buf, format="JPEG")
    (d / "trailer.jpg").write_bytes(buf.getvalue() + b"MakerTrailer" * 20)
    (d / "cut.jpg").write_bytes(buf.getvalue()[:-30])
    src = open_source(tmp_path / "t", warn=False)
    assert [n.split("/")[-1] for n in src.names] == ["trailer.jpg"]
    assert [p.split("/")[-1] for p, _ in src.bad] == ["cut.jpg"]


def test_abandoned_epoch_then_next_epoch_with_workers(folder):
    """Breaking out of an epoch (persistent workers still hold prefetched batches) must not leak
    stale batches into the next epoch."""
    kw = dict(batch_size=4, img_size=IMG, output="uint8", num_workers=2)
    ld = build_loader(folder, **kw)
    collect(ld, n=2)
    ld.set_epoch(1)
    got = collect(ld)
    ref = build_loader(folder, **{**kw, "num_workers": 0})
    ref.set_epoch(1)
    want = collect(ref)
    assert len(got) == len(want) == 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))


def test_scan_index_cache_rechecks_only_changed_files(tmp_path, monkeypatch):
    import fastmae.data.sources as sources

    root = write_folder(tmp_path / "d", per_class=3)
    calls = []
    real = sources._check_file
    monkeypatch.setattr(sources, "_check_file", lambda f, m: calls.append(f) or real(f, m))
    cache = tmp_path / "cache"
    first = open_source(root, index_cache=cache, warn=False)
    assert len(calls) == 9 and len(list(cache.iterdir())) == 1
    calls.clear()
    again = open_source(root, index_cache=cache, warn=False)
    assert calls == [] and again.locs == first.locs and again.sizes == first.sizes
    victim = root / "class1" / "001.jpg"
    victim.write_bytes(victim.read_bytes()[:-100])  # now truncated: must be noticed
    Image.new("RGB", (50, 40)).save(root / "class2" / "new.jpg")
    third = open_source(root, index_cache=cache, warn=False)
    assert sorted(p.split("/")[-1] for p in calls) == ["001.jpg", "new.jpg"]
    assert [p for p, _ in third.bad] == [str(victim)] and len(third) == 9
