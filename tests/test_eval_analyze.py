"""Attention diagnostics on hand-built maps, linear CKA on constructed features, and the analyze command."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from fastmae.eval.analyze import attention_distance, attention_entropy, attention_stats, head_kl, linear_cka, main
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
    cka = list(csv.DictReader((out / "cka.csv").open()))
    assert len(cka) == 2 * 3 * 3  # (trained vs trained, trained vs random) x (embeddings + 2 blocks)^2
    for r in cka:
        if r["model_b"] == "trained" and r["layer_a"] == r["layer_b"]:
            assert float(r["cka"]) == pytest.approx(1.0, abs=1e-9)
        assert -1e-9 <= float(r["cka"]) <= 1 + 1e-9
    assert (out / "cka.png").stat().st_size > 1000


def test_analyze_cli_bad_checkpoint(tmp_path, capsys):
    torch.save({"model": {"foo": torch.zeros(2)}}, tmp_path / "bad.pt")
    rc = main([f"--ckpts={tmp_path / 'bad.pt'}", f"--output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error:") and "not a ViT/MAE encoder" in err


def _cka_features_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. for linear CKA in feature space: |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F), centered."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_on_constructed_features():
    rng = np.random.default_rng(0)
    n, d = 3000, 8
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, 5)) + 0.5 * x[:, :5]
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a random orthogonal matrix
    t = torch.from_numpy
    assert linear_cka(t(x), t(x)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(t(x), t(3.7 * x @ q)) == pytest.approx(1.0, abs=1e-12)  # rotation and isotropic scale
    independent = linear_cka(t(x), t(rng.normal(size=(n, d))))
    assert independent < 0.01
    assert linear_cka(t(x @ q), t(0.2 * y)) == pytest.approx(linear_cka(t(x), t(y)), abs=1e-12)
    assert linear_cka(t(x), t(y)) == pytest.approx(_cka_features_formula(x, y), abs=1e-12)
    # not invariant to anisotropic scaling (so the invariances above are not vacuous)
    assert linear_cka(t(x), t(x * np.arange(1, d + 1))) < 0.99
    # token features (N, T, D) are compared as flattened vectors
    tok = rng.normal(size=(200, 4, 6))
    assert linear_cka(t(tok), t(tok.reshape(200, -1) @ np.linalg.qr(rng.normal(size=(24, 24)))[0])) == pytest.approx(1.0)
