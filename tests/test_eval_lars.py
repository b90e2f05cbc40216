"""LARS against its formula, written out independently in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.eval.lars import LARS


def _reference(params, grads_seq, lr, wd, mom, eta):
    """params: list of arrays; grads_seq: per step a list of grads -> params after the steps (float64)."""
    ps = [p.astype(np.float64).copy() for p in params]
    bufs = [np.zeros_like(p) for p in ps]
    for grads in grads_seq:
        for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
            d = g.astype(np.float64)
            if p.ndim > 1:
                d = d + wd * p
                pn, dn = np.sqrt((p * p).sum()), np.sqrt((d * d).sum())
                q = eta * pn / dn if pn > 0 and dn > 0 else 1.0
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
    opt = LARS(params, lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    expected = _reference(init, grads, lr, wd, mom, eta)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-12)


def test_lars_bias_and_norm_get_plain_momentum_sgd():
    b = torch.nn.Parameter(torch.ones(3))
    opt = LARS([b], lr=0.5, weight_decay=1.0, momentum=0.0, trust_coefficient=1e-3)
    b.grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.zeros(3))  # 1 - 0.5 * 2, no decay, no trust ratio


def test_lars_trust_ratio_sets_the_relative_step():
    w = torch.nn.Parameter(torch.randn(8, 8))
    before = w.detach().clone()
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.randn(8, 8) * 1000.0  # the gradient scale must not matter
    opt.step()
    rel = (w.detach() - before).norm() / before.norm()
    torch.testing.assert_close(rel, torch.tensor(0.01))


def test_lars_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, momentum=1.5)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(p, trust_coefficient=0.0)
