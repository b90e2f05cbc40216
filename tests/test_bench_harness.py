"""bench/_harness.py, the one timing harness of bench/ and the one builder of the HF ViTMAE step (issue 23)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _harness  # noqa: E402

CPU = torch.device("cpu")


def test_rounds_are_interleaved_after_the_warm_up():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = _harness.interleaved(fns, CPU, warmup=2, repeats=3)
    assert calls == ["a", "b", "c"] * 5  # 2 warm-up rounds, then 3 timed rounds, round-robin
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_spread_is_median_p20_p80_in_ms():
    assert _harness.spread_ms([0.001, 0.002, 0.003, 0.004, 0.010]) == pytest.approx((3.0, 1.8, 5.2))
    assert _harness.spread_ms([0.002]) == (2.0, 2.0, 2.0)
    median, p20, p80 = _harness.time_ms(lambda: sum(range(1000)), CPU, warmup=1, repeats=5)
    assert 0 < p20 <= median <= p80


def test_hf_step_starts_from_our_weights_and_masks():
    """The HF model gets fastmae's config and weights: with the same noise its first loss is fastmae's."""
    pytest.importorskip("transformers")
    from fastmae import mae_vit_tiny

    torch.manual_seed(0)
    ours = mae_vit_tiny(img_size=32, patch_size=8, norm_pix_loss=True)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, ours.patch_embed.num_patches)
    step = _harness.hf_vitmae_step(ours, x, noise)
    first = step()
    torch.testing.assert_close(first, ours(x, 0.75, noise)[0].detach(), rtol=1e-5, atol=1e-6)
    assert step() < first  # AdamW stepped the HF copy (same batch and masks: the loss falls)
