"""Attention diagnostics on hand-built maps, and the analyze command."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from fastmae.eval.analyze import attention_distance, attention_entropy, attention_stats, head_kl, main
from fastmae.models.vit import VisionTransformer


def _maps_2x2():
    """B=1, H=2 heads, 1 cls + 4 patches on a 2x2 grid (patch 4 px: centres (2,2), (2,6), (6,2), (6,6))."""
    T = 5
    a = torch.zeros(1, 2, T, T)
    # head 0: every patch query looks only at the diagonally opposite patch (distance 4*sqrt(2)).
    for q in range(4):
        a[0, 0, 1 + q, 1 + (3 - q)] = 1.0
    a[0, 0, 0, 0] = 1.0
    # head 1: 0.2 on the cls key and 0.2 on each patch; the cls share is renormalized away.
    a[0, 1] = 0.2
    return a


def test_attention_distance_hand_computed():
    d = attention_distance(_maps_2x2(), (2, 2), 4)
    opposite = 4 * math.sqrt(2)
    uniform = (0 + 4 + 4 + opposite) / 4  # from any corner: itself, two neighbours, the opposite corner
    torch.testing.assert_close(d, torch.tensor([opposite, uniform]))


def test_attention_distance_checks_the_grid():
    with pytest.raises(ValueError, match="do not match"):
        attention_distance(_maps_2x2(), (3, 3), 4)


def test_entropy_uniform_and_one_hot():
    T = 7
    uniform = torch.full((2, 3, T, T), 1.0 / T)
    one_hot = torch.eye(T).expand(2, 3, T, T)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), math.log(T)))
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(3))


def test_kl_between_heads():
    T = 6
    uniform = torch.full((T, T), 1.0 / T)
    one_hot = torch.eye(T)
    same = torch.stack([uniform, uniform, uniform]).unsqueeze(0)
    torch.testing.assert_close(head_kl(same), torch.zeros(3))
    mixed = torch.stack([one_hot, uniform]).unsqueeze(0)
    eps = 1e-8
    kl_onehot_uniform = math.log(T)
    kl_uniform_onehot = -math.log(T) - (1 / T) * math.log(1.0) - ((T - 1) / T) * math.log(eps)
    torch.testing.assert_close(head_kl(mixed, eps=eps), torch.tensor([kl_onehot_uniform, kl_uniform_onehot]))
    # three heads: each head's value is the mean over the two others
    three = torch.stack([one_hot, uniform, uniform]).unsqueeze(0)
    expected = torch.tensor([kl_onehot_uniform, kl_uniform_onehot / 2, kl_uniform_onehot / 2])
    torch.testing.assert_close(head_kl(three, eps=eps), expected)


def test_attention_stats_shapes():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=4,
                              pixel_mean=(0.5,), pixel_std=(0.5,))
    s = attention_stats(model, torch.randn(10, 1, 16, 16), batch=4)
    for v in s.values():
        assert v.shape == (3, 4) and torch.isfinite(v).all()
    max_dist = math.hypot(12, 12)
    assert (s["avg_distance_px"] > 0).all() and (s["avg_distance_px"] < max_dist).all()
    assert (s["entropy"] <= math.log(17) + 1e-5).all()


def test_analyze_cli_writes_csv_and_figure(tmp_path, capsys):
    from fastmae.eval.models import DIGITS_ARCH

    torch.manual_seed(1)
    arch = dict(DIGITS_ARCH, embed_dim=32, depth=2, num_heads=2)
    model = VisionTransformer(**arch, pixel_mean=(0.5,), pixel_std=(0.5,))
    ckpt = tmp_path / "enc.pt"
    torch.save({"model": model.state_dict(), "arch": arch}, ckpt)
    out = tmp_path / "out"
    rc = main([f"--ckpts={ckpt},random", "--labels=trained,random", "--num_images=16", f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "attention_stats.csv").open()))
    assert len(rows) == 2 * 2 * 2  # models x layers x heads
    assert {r["model"] for r in rows} == {"trained", "random"}
    assert (out / "attention_stats.png").stat().st_size > 1000
    assert (out / "config.json").is_file()


def test_analyze_cli_bad_checkpoint(tmp_path, capsys):
    torch.save({"model": {"foo": torch.zeros(2)}}, tmp_path / "bad.pt")
    rc = main([f"--ckpts={tmp_path / 'bad.pt'}", f"--output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error:") and "not a ViT/MAE encoder" in err
