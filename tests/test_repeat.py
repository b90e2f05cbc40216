"""Repeated sampling: one decode, K independent crops per file; epochs count samples; exact mid-epoch resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmae.data import build_loader
from fastmae.data.augment import train_params_batch

KW = dict(batch_size=8, img_size=32, output="uint8", num_workers=0, seed=5)


def test_k_crops_of_one_file_per_group_and_epoch_counts_samples(demo_dir):
    plain = build_loader(demo_dir, **KW)
    rep = build_loader(demo_dir, repeat_samples=4, **KW)
    files = len(rep.source)
    assert rep.num_samples == 4 * files and rep.steps_per_epoch == files * 4 // 8
    assert plain.steps_per_epoch == files // 8
    x, y = next(iter(rep))
    assert x.shape == (8, 32, 32, 3) and torch.equal(y, y[::4].repeat_interleave(4))
    ids = rep.epoch_indices(rep.epoch)[:8]
    assert np.array_equal(ids // 4, np.repeat(ids[::4] // 4, 4))  # K consecutive samples of one file
    windows = train_params_batch(5, rep.epoch, ids, *np.asarray(rep.source.sizes)[ids // 4].T)
    assert len({tuple(w) for w in windows[:4].tolist()}) == 4  # independent crops
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(x[a], x[b])


def test_repeat_one_equals_plain_loader_draws(demo_dir):
    rep = build_loader(demo_dir, repeat_samples=1, **KW)
    plain = build_loader(demo_dir, **KW)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rep, plain, strict=True))


@pytest.mark.parametrize("decode", ["pil", "fast"])
def test_resume_mid_epoch_is_bit_identical(demo_dir, decode):
    ref = build_loader(demo_dir, repeat_samples=2, decode=decode, **KW)
    ref.set_epoch(1)
    batches = [b for b, _ in zip(ref, range(6), strict=False)]
    sd = None
    ld = build_loader(demo_dir, repeat_samples=2, decode=decode, **KW)
    ld.set_epoch(1)
    for i, _ in enumerate(ld):
        if i == 2:
            sd = ld.state_dict()
            break
    assert sd["step"] == 3 and sd["repeat_samples"] == 2
    resumed = build_loader(demo_dir, repeat_samples=2, decode=decode, **KW)
    resumed.load_state_dict(json.loads(json.dumps(sd)))
    resumed.set_epoch(1)
    for (x, y), (rx, ry) in zip(batches[3:], resumed, strict=False):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other = build_loader(demo_dir, repeat_samples=4, decode=decode, **KW)
    with pytest.raises(ValueError, match="repeat_samples=2"):
        other.load_state_dict(sd)


def test_bad_settings_are_one_line_errors(demo_dir):
    with pytest.raises(ValueError, match="multiple of it"):
        build_loader(demo_dir, repeat_samples=3, **KW)
    with pytest.raises(ValueError, match="random crops"):
        build_loader(demo_dir, repeat_samples=2, train=False, **{**KW, "batch_size": 4})
    with pytest.raises(ValueError, match="loader='torch'"):
        build_loader(demo_dir, repeat_samples=2, loader="dali", **KW)


def test_training_resumes_bit_identically_with_repeat(tmp_path, demo_dir, fresh_env):
    import signal

    from test_train import final_params, train

    args = ["--max_steps=6", "--ckpt_every=3", "--repeat_samples=2", "--decode=fast"]
    ref = tmp_path / "ref"
    r = train(ref, demo_dir, *args, env=fresh_env)
    assert "repeat_samples=2: each image is decoded once" in r.stdout
    out = tmp_path / "killed"
    r = train(out, demo_dir, *args, env={**fresh_env, "FASTMAE_FAULT": "after_step@4"}, check=False)
    assert r.returncode == -signal.SIGKILL
    train(out, demo_dir, *args, "--resume=auto", env=fresh_env)
    a, b = final_params(ref, 6), final_params(out, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
