"""Evaluation optimizers against their formulas, written out independently (numpy / the BEiT-MAE rule).

LARS: MAE's update (trust ratio eta |w| / |g + wd w| on weights, plain momentum SGD on biases and norms);
timm's ratio with weight decay uses the LARC bound |g| + wd |w| instead (see fastmae/eval/optim.py), checked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.eval.optim import lars, param_groups_layer_decay
from fastmae.models.vit import VisionTransformer


def _reference(params, grads_seq, lr, wd, mom, eta, larc_bound=False):
    """params: list of arrays; grads_seq: per step a list of grads -> params after the steps (float64)."""
    ps = [p.astype(np.float64).copy() for p in params]
    bufs = [np.zeros_like(p) for p in ps]
    for grads in grads_seq:
        for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
            d = g.astype(np.float64)
            if p.ndim > 1:
                pn, gn = np.sqrt((p * p).sum()), np.sqrt((d * d).sum())
                d = d + wd * p
                dn = gn + wd * pn if larc_bound else np.sqrt((d * d).sum())
                q = eta * pn / dn if pn > 0 and gn > 0 else 1.0
                d = d * q
            bufs[i] = mom * bufs[i] + d
            ps[i] = p - lr * bufs[i]
    return ps


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_formula(wd):
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(3, 4)), rng.normal(size=(3,)), np.zeros((2, 2)), rng.normal(size=(5, 2, 2))]
    grads = [[rng.normal(size=p.shape) for p in init] for _ in range(4)]
    lr, mom, eta = 0.7, 0.9, 0.01
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
    opt = lars(params, lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    # the official recipe (wd = 0): MAE's formula exactly; with wd: the LARC bound in the denominator
    expected = _reference(init, grads, lr, wd, mom, eta, larc_bound=wd > 0)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)
    if wd > 0:
        mae = _reference(init, grads, lr, wd, mom, eta)
        assert not np.allclose(mae[0], expected[0], rtol=1e-9), "the two trust ratios should differ with wd > 0"


def test_lars_bias_and_norm_get_plain_momentum_sgd():
    b = torch.nn.Parameter(torch.ones(3))
    opt = lars([b], lr=0.5, weight_decay=1.0, momentum=0.0, trust_coefficient=1e-3)
    b.grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.zeros(3))  # 1 - 0.5 * 2, no decay, no trust ratio


def test_lars_trust_ratio_sets_the_relative_step():
    w = torch.nn.Parameter(torch.randn(8, 8))
    before = w.detach().clone()
    opt = lars([w], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.randn(8, 8) * 1000.0  # the gradient scale must not matter
    opt.step()
    rel = (w.detach() - before).norm() / before.norm()
    torch.testing.assert_close(rel, torch.tensor(0.01))


def test_lars_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="momentum"):
        lars(p, momentum=1.5)
    with pytest.raises(ValueError, match="trust_coefficient"):
        lars(p, trust_coefficient=0.0)


def _expected_layer(name: str, depth: int) -> int:
    # Written out by hand from the BEiT/MAE rule.
    if name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name in ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"), name
    return depth + 1


@pytest.mark.parametrize("global_pool", [False, True])
def test_every_parameter_gets_its_scale(global_pool):
    depth, decay, wd = 3, 0.65, 0.05
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=depth, num_heads=2,
                              num_classes=10, global_pool=global_pool, learn_pos_embed=True,
                              pixel_mean=(0.5,), pixel_std=(0.5,))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in param_groups_layer_decay(model, wd, decay):
        for p in g["params"]:
            assert names[id(p)] not in seen, f"{names[id(p)]} in two groups"
            seen[names[id(p)]] = (g["lr_scale"], g["weight_decay"], p)
    assert set(seen) == set(names.values())
    for name, (scale, group_wd, p) in seen.items():
        assert scale == pytest.approx(decay ** (depth + 1 - _expected_layer(name, depth))), name
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert group_wd == (0.0 if no_wd else wd), name
    assert seen["head.weight"][0] == 1.0
    assert seen["cls_token"][0] == pytest.approx(decay ** (depth + 1))
    assert seen["blocks.0.attn.qkv.weight"][0] == pytest.approx(decay**depth)


def test_frozen_parameters_are_left_out():
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                              num_classes=3, pixel_mean=(0.5,), pixel_std=(0.5,))
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for g in param_groups_layer_decay(model, 0.05, 0.75) for p in g["params"]}
    assert "pos_embed" not in kept  # the fixed sin-cos table
    assert "head.weight" in kept


def test_bad_decay():
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                              pixel_mean=(0.5,), pixel_std=(0.5,))
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, 0.05, 1.5)
