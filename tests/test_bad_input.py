"""Every bad input raises a ValueError naming the problem, before any compute."""

from __future__ import annotations

import pytest
import torch

from fastmae import mae_vit_tiny


@pytest.fixture(scope="module")
def model():
    return mae_vit_tiny(img_size=32, patch_size=4)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: torch.randn(2, 3, 30, 32), {}, "not divisible by the patch size 4"),
        (lambda: torch.randn(2, 3, 32, 32), dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
        (lambda: torch.randn(2, 3, 32, 32), dict(mask_ratio=-0.1), r"mask_ratio must be in \[0, 1\)"),
        (lambda: torch.randn(2, 3, 32, 32), dict(mask_ratio=0.99), "leaves no visible patch"),
        (lambda: torch.randn(2, 1, 32, 32), {}, "expected 3 channels"),
        (lambda: torch.randint(0, 255, (2, 32, 32, 4), dtype=torch.uint8), {}, "expected 3 channels"),
        (lambda: torch.randn(3, 32, 32), {}, "must have 4 dims"),
        (lambda: torch.randint(0, 9, (2, 3, 32, 32)), {}, "must be float"),
        (lambda: torch.randn(2, 3, 32, 32), dict(noise=torch.rand(2, 10)), r"noise must have shape \(N, L\)"),
    ],
)
def test_bad_input_raises(model, make, kwargs, match, monkeypatch):
    calls = []
    monkeypatch.setattr(model.patch_embed, "forward", lambda *a: calls.append(a))
    with pytest.raises(ValueError, match=match):
        model(make(), **kwargs)
    assert not calls, "compute started before the input was checked"


def test_bad_construction():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        mae_vit_tiny(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="loss_type"):
        mae_vit_tiny(loss_type="huber")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        mae_vit_tiny(embed_dim=100, num_heads=3)


def test_mask_ratio_zero_keeps_all_and_loss_is_zero(model):
    loss, pred, mask = model(torch.randn(1, 3, 32, 32), mask_ratio=0.0)
    assert mask.sum() == 0 and loss.item() == 0.0
    loss.backward()
