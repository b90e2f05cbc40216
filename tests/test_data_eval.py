"""Evaluation-scale data: ImageNet layouts (folders and tar shards) with labels, augment modes
(mae / linprobe / timm finetune / eval), and validation sharding that counts every sample once."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from test_data_helpers import photos, write_tars

from fastmae.data import build_loader
from fastmae.data.augment import AUGMENT_SCALES, sample_seed, train_params, train_params_batch

IMG = 32
CLASSES = ["astronaut", "chelsea", "coffee"]


def _write_split(root, split, per_class, seed, skip=()):
    rng = np.random.default_rng(seed)
    for name, img in zip(CLASSES, photos(), strict=True):
        if name in skip:
            continue
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        h, w = img.shape[:2]
        for k in range(per_class):
            cw, ch = (int(v) for v in rng.integers(40, 97, size=2))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            Image.fromarray(img[y : y + ch, x : x + cw]).save(d / f"{k:03d}.jpg", quality=90)


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    """ROOT/{train,val}/<class>/*.jpg, and the same as ROOT_tar/{train,val}/*.tar with .cls labels."""
    base = tmp_path_factory.mktemp("inet")
    root = base / "folders"
    _write_split(root, "train", 6, 0)
    _write_split(root, "val", 3, 1)
    for split in ("train", "val"):
        write_tars(root / split, base / "tars" / split, shards=2)
    return root, base / "tars"


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _expected_eval(root, split):
    """Independent of the loader: files in class-then-name order, resize + center crop by torchvision."""
    imgs, labels = [], []
    for ci, name in enumerate(CLASSES):
        for f in sorted((root / split / name).glob("*.jpg")):
            im = Image.open(f).convert("RGB")
            imgs.append(np.asarray(TF.center_crop(TF.resize(im, int(IMG / 0.875), TF.InterpolationMode.BICUBIC), IMG)))
            labels.append(ci)
    return np.stack(imgs), np.array(labels)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_imagenet_layouts_stream_images_with_labels(inet, split, layout):
    root, tars = inet
    spec = root if layout == "folders" else tars
    ld = build_loader(
        spec,
        split=split,
        batch_size=4,
        img_size=IMG,
        augment="eval",
        shuffle=False,
        drop_last=False,
        output="uint8",
        num_workers=2,
        require_labels=True,
    )
    want_x, want_y = _expected_eval(root, split)
    got = _collect(ld)
    assert all(y.dtype == torch.int64 for _, y in got)
    x = torch.cat([b[0] for b in got]).numpy()
    y = torch.cat([b[1] for b in got]).numpy()
    assert np.array_equal(y, want_y) and np.array_equal(x, want_x)
    assert ld.num_classes == 3
    if layout == "folders":
        assert ld.classes == CLASSES


def test_class_ids_are_shared_by_the_splits(tmp_path, inet):
    root = tmp_path / "d"
    _write_split(root, "train", 2, 0)
    _write_split(root, "val", 2, 1, skip=("astronaut",))  # val lacks the first class folder
    val = build_loader(root, split="val", batch_size=2, img_size=IMG, train=False, num_workers=0, output="uint8")
    assert val.classes == CLASSES and sorted(set(val.dataset.src.labels)) == [1, 2]
    # a validation set given on its own keeps the train set's ids when pinned with classes=
    alone = build_loader(root / "val", batch_size=2, img_size=IMG, train=False, num_workers=0, output="uint8")
    assert alone.classes == ["chelsea", "coffee"] and sorted(set(alone.dataset.src.labels)) == [0, 1]
    pinned = build_loader(root / "val", batch_size=2, img_size=IMG, train=False, num_workers=0, output="uint8", classes=CLASSES)
    assert pinned.dataset.src.labels == val.dataset.src.labels
    with pytest.raises(ValueError, match="not among the 2 given classes"):
        build_loader(root / "val", batch_size=2, img_size=IMG, classes=["chelsea", "x"])
    _, tars = inet
    with pytest.raises(ValueError, match="only 2 classes were given"):
        build_loader(tars, split="val", batch_size=2, img_size=IMG, classes=["a", "b"])


def test_unlabeled_shards_fail_when_labels_are_required(tmp_path, inet):
    import io
    import tarfile

    tp = tmp_path / "u.tar"
    buf = io.BytesIO()
    Image.fromarray(photos()[0][:50, :60]).save(buf, format="JPEG")
    with tarfile.open(tp, "w") as tf:
        ti = tarfile.TarInfo("a.jpg")
        ti.size = len(buf.getvalue())
        tf.addfile(ti, io.BytesIO(buf.getvalue()))
    assert build_loader(str(tp), batch_size=1, img_size=IMG, num_workers=0).num_samples == 1
    with pytest.raises(ValueError, match="no .cls label"):
        build_loader(str(tp), batch_size=1, img_size=IMG, require_labels=True)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_validation_shards_count_every_sample_once(inet, loader):
    """9 val images on 2 ranks: 5 batches slots each, one padding slot marked -1; every image once."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    root, _ = inet
    kw = dict(split="val", batch_size=2, img_size=IMG, train=False, drop_last=False, output="uint8", loader=loader, num_workers=1)
    whole = _collect(build_loader(root, **kw))
    want = sorted(x.numpy().tobytes() + bytes([int(y)]) for xb, yb in whole for x, y in zip(xb, yb, strict=True))
    assert len(want) == 9
    seen, shapes = [], []
    for r in range(2):
        ld = build_loader(root, rank=r, world_size=2, **kw)
        batches = _collect(ld)
        shapes.append([tuple(x.shape) for x, _ in batches])
        for xb, yb in batches:
            seen += [x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(xb, yb, strict=True) if y >= 0]
        assert ld.num_valid == (5 if r == 0 else 4)
        assert sum(int((y < 0).sum()) for _, y in batches) == (0 if r == 0 else 1)
    assert shapes[0] == shapes[1]  # same steps and batch shapes: collectives stay in step
    assert sorted(seen) == want


def test_linprobe_crops(inet):
    W, H, n = 500, 375, 4000
    p = train_params_batch(0, 0, np.arange(n), np.full(n, W), np.full(n, H), AUGMENT_SCALES["linprobe"])
    scale = p[:, 2] * p[:, 3] / (W * H)
    assert 0.075 < scale.min() < 0.1 and scale.max() <= 1.0 and abs(p[:, 4].mean() - 0.5) < 0.03
    root, _ = inet
    ld = build_loader(root, batch_size=4, img_size=IMG, augment="linprobe", num_workers=0, output="uint8", seed=3)
    x, _ = next(iter(ld))
    for k, idx in enumerate(ld.epoch_indices(0)[:4].tolist()):
        im = Image.open(ld.dataset.src.locs[idx]).convert("RGB")
        left, top, w, h, flip = train_params(3, 0, idx, *im.size, scale=(0.08, 1.0))
        ref = TF.resized_crop(im, top, left, h, w, [IMG, IMG], interpolation=TF.InterpolationMode.BICUBIC)
        assert np.array_equal(x[k].numpy(), np.asarray(TF.hflip(ref) if flip else ref))


def _timm_reference(path, seed, epoch, index):
    """timm's official fine-tuning transform on one file, seeded as the loader documents."""
    from timm.data import create_transform

    tf = create_transform(
        input_size=IMG,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    )
    s = sample_seed(seed, epoch, index)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)
    return tf(Image.open(path).convert("RGB"))


def test_finetune_augmentation_is_timms_and_a_pure_function_of_seed_epoch_index(inet):
    root, _ = inet
    kw = dict(batch_size=4, img_size=IMG, augment="finetune", seed=11)
    ld = build_loader(root, num_workers=0, **kw)
    text = repr(ld.dataset.finetune)
    assert "RandAugment" in text and "RandomErasing" in text
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    e0 = _collect(ld)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])  # the training process's generators are untouched
    x0, _ = e0[0]
    assert x0.shape == (4, 3, IMG, IMG) and x0.dtype == torch.float32
    for k, idx in enumerate(ld.epoch_indices(0)[:4].tolist()):
        ref = _timm_reference(ld.dataset.src.locs[idx], 11, 0, idx)
        assert torch.equal(x0[k], ref)
    e1 = _collect(ld)
    assert ld.epoch == 1 and not torch.equal(e0[0][0], e1[0][0])
    # other worker count and a mid-epoch resume: the same tensors
    w2 = build_loader(root, num_workers=2, **kw)
    it = iter(w2)
    head = [next(it) for _ in range(2)]
    res = build_loader(root, num_workers=1, **kw)
    res.load_state_dict(w2.state_dict())
    got = head + _collect(res)
    assert len(got) == len(e0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, e0, strict=True))
    with pytest.raises(ValueError, match="needs output='float'"):
        build_loader(root, output="uint8", **kw)


def test_dali_finetune_falls_back_to_torch_with_a_reason(inet, caplog):
    pytest.importorskip("nvidia.dali")
    root, _ = inet
    kw = dict(batch_size=4, img_size=IMG, augment="finetune", num_workers=0, seed=1)
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        ld = build_loader(root, loader="dali", **kw)
    assert ld.kind == "torch" and "RandAugment" in caplog.text
    assert torch.equal(next(iter(ld))[0], next(iter(build_loader(root, **kw)))[0])


def test_dali_linprobe_and_eval_track_torch(inet):
    pytest.importorskip("nvidia.dali")
    root, _ = inet
    for augment in ("linprobe", "eval"):
        kw = dict(batch_size=6, img_size=IMG, augment=augment, num_workers=1, output="uint8", seed=5)
        for (xd, yd), (xt, yt) in zip(
            _collect(build_loader(root, loader="dali", **kw)), _collect(build_loader(root, **kw)), strict=True
        ):
            assert torch.equal(yd, yt) and (xd.float() - xt.float()).abs().mean() < 1.5
