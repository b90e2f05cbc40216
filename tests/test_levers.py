"""The compute levers of issue 22, on CPU: each off by default, each leaving the official path alone when off."""

from __future__ import annotations

import pytest
import torch

from fastmae import ops
from fastmae.models.mae import create_model

# ---- lever 2: the decoder position table in the autocast dtype ------------------------------------------------


def _decoder_inputs(monkeypatch, model, imgs, noise) -> list[torch.Tensor]:
    """Run one bf16-autocast forward and return what K2 (ops.unshuffle_scatter) handed the decoder."""
    seen = []
    real = ops.unshuffle_scatter

    def spy(*args):
        out = real(*args)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(ops, "unshuffle_scatter", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs, noise=noise)
    return seen


def test_decoder_input_follows_autocast_and_the_checkpoint_keeps_the_fp32_table(monkeypatch):
    torch.manual_seed(0)
    official = create_model("mae_vit_tiny")
    torch.manual_seed(0)
    lever = create_model("mae_vit_tiny", decoder_input_dtype="autocast")
    sd_o, sd_l = official.state_dict(), lever.state_dict()
    assert list(sd_o) == list(sd_l)  # same names, same order: official checkpoints load strict
    assert all(torch.equal(sd_o[k], sd_l[k]) and sd_o[k].dtype == sd_l[k].dtype for k in sd_o)
    assert sd_l["decoder_pos_embed"].dtype == torch.float32
    lever.load_state_dict(sd_o, strict=True)

    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    (out_o,) = _decoder_inputs(monkeypatch, official, imgs, noise)
    (out_l,) = _decoder_inputs(monkeypatch, lever, imgs, noise)
    assert out_o.dtype == torch.float32 and out_l.dtype == torch.bfloat16
    # The bf16 input is the fp32 one rounded, plus the table's own rounding (|pos| <= 1: at most 2**-9 absolute).
    torch.testing.assert_close(out_l.float(), out_o, rtol=2**-8, atol=2**-8)
    # Without autocast nothing changes: fp32 in, fp32 out.
    with torch.no_grad():
        assert lever.decoder_pos_embed_for(lever.patch_embed.grid_size).dtype == torch.float32


def test_decoder_input_autocast_loss_and_gradients_match_the_fp32_path_within_bf16():
    torch.manual_seed(0)
    a = create_model("mae_vit_tiny", norm_pix_loss=True)
    b = create_model("mae_vit_tiny", norm_pix_loss=True, decoder_input_dtype="autocast")
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(4, 3, 64, 64), torch.rand(4, 64)
    losses, grads = [], []
    for m in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(imgs, noise=noise)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.decoder_embed.weight.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-2 * grads[0].abs().max().item())


def test_decoder_input_auto_follows_the_residual_stream():
    assert create_model("mae_vit_tiny").decoder_input_dtype == "fp32"
    assert create_model("mae_vit_tiny", residual_dtype="bf16").decoder_input_dtype == "autocast"
    assert create_model("mae_vit_tiny", residual_dtype="bf16", decoder_input_dtype="fp32").decoder_input_dtype == "fp32"
    with pytest.raises(ValueError, match="decoder_input_dtype must be one of"):
        create_model("mae_vit_tiny", decoder_input_dtype="bf16")


def test_k2_bytes_at_batch_256_halve_with_a_bf16_decoder_input():
    from fastmae.engine.levers import k2_bytes

    # ViT-B/16: 196 patches, 49 visible, decoder width 512; counted by hand in bench/RESULTS.md section 3.
    fp32 = k2_bytes(256, 196, 49, 512, out_bytes=4)
    bf16 = k2_bytes(256, 196, 49, 512, out_bytes=2)
    assert fp32 / 1e6 == pytest.approx(234.0, abs=0.5)
    assert bf16 / 1e6 == pytest.approx(130.0, abs=1.5)
