"""One loader contract for images and clips: state dict, exact mid-epoch resume, sharding across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_helpers import photos, write_folder

from fastmae.data import build_loader, build_video_loader


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("img"), per_class=6)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    pytest.importorskip("av")
    from fastmae.data.video_demo import encode_video

    root = tmp_path_factory.mktemp("clips")
    for ci, img in enumerate(photos()):
        (root / f"c{ci}").mkdir()
        for k in range(4):
            frames = np.stack([img[40 + 2 * f : 88 + 2 * f, 60 + 3 * k : 108 + 3 * k] for f in range(10)])
            encode_video(root / f"c{ci}" / f"{k}.webm", frames, "vp9")
    return root


def _make(kind, root, **kw):
    if kind == "image":
        return build_loader(root, batch_size=2, img_size=16, output="uint8", seed=3, **kw)
    return build_video_loader(
        root, split="train", batch_size=2, img_size=16, num_frames=3, frame_stride=2, output="uint8", seed=3, **kw
    )


@pytest.mark.parametrize("kind", ["image", "video"])
def test_same_state_dict_contract(kind, image_root, clip_root):
    root = image_root if kind == "image" else clip_root
    ref = _make(kind, root, num_workers=0)
    ref.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y in ref]
    n = ref.steps_per_epoch
    assert len(full) == n >= 4 and set(ref.state_dict()) >= {"epoch", "step", "seed", "batch_size", "world_size"}

    ld = _make(kind, root, num_workers=0)
    ld.set_epoch(2)
    it = iter(ld)
    head = [next(it) for _ in range(2)]
    sd = ld.state_dict()
    assert (sd["epoch"], sd["step"]) == (2, 2)
    new = _make(kind, root, num_workers=2)  # another worker count
    new.load_state_dict(sd)
    new.set_epoch(2)  # the engine's per-epoch call keeps the restored step
    got = head + list(new)
    assert len(got) == n
    for (x1, y1), (x2, y2) in zip(full, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert new.state_dict()["step"] == n
    new.set_epoch(3)
    assert new.state_dict()["step"] == 0


@pytest.mark.parametrize("kind", ["image", "video"])
def test_two_ranks_disjoint(kind, image_root, clip_root):
    root = image_root if kind == "image" else clip_root
    ranks = [_make(kind, root, num_workers=0, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    for epoch in (0, 1):
        ids = [set(r.epoch_indices(epoch).tolist()) for r in ranks]
        assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == ranks[0].steps_per_epoch * 2
        for r in ranks:
            r.set_epoch(epoch)
        b0, b1 = [torch.cat([x for x, _ in r]) for r in ranks]
        # no clip or image is delivered to both ranks
        assert not any(torch.equal(a, b) for a in b0 for b in b1)
