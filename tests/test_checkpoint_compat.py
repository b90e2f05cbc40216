"""Official MAE checkpoints load with strict=True, safely; other resolutions; clear mismatch errors."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from fastmae import VisionTransformer, mae_vit_base_patch16, mae_vit_tiny
from fastmae.convert import load_pretrained, read_checkpoint


def _official_vit_b_shapes() -> dict[str, tuple[int, ...]]:
    # Written from the published architecture (official models_mae.py names), not from our model.
    D, Dd, L, P = 768, 512, 196, 16 * 16 * 3
    s = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, 3, 16, 16),
         "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
         "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
         "decoder_pos_embed": (1, L + 1, Dd), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
         "decoder_pred.weight": (P, Dd), "decoder_pred.bias": (P,)}
    for prefix, n, d in (("blocks", 12, D), ("decoder_blocks", 8, Dd)):
        for i in range(n):
            b = f"{prefix}.{i}."
            s.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                      b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                      b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                      b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return s


def test_official_vit_b_checkpoint_loads_strict(tmp_path):
    shapes = _official_vit_b_shapes()
    sd = {k: torch.randn(v) for k, v in shapes.items()}
    ckpt = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
            "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, mask_ratio=0.75)}
    path = tmp_path / "mae_pretrain_official.pth"
    torch.save(ckpt, path)

    loaded = read_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace)
    model = mae_vit_base_patch16(norm_pix_loss=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(loaded["model"], strict=True)
    load_pretrained(model, path)
    assert torch.equal(model.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])

    # The encoder-only release loads into a bare ViT-B encoder.
    enc = VisionTransformer(embed_dim=768, depth=12, num_heads=12)
    load_pretrained(enc, path)
    assert torch.equal(enc.norm.weight, sd["norm.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastmae_pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_checkpoint(path)
    assert not os.path.exists("/tmp/fastmae_pwned")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_wrong_architecture_names_keys_and_shapes():
    small = mae_vit_tiny(img_size=32, patch_size=4)
    other = mae_vit_tiny(img_size=32, patch_size=4, embed_dim=96, depth=3)
    with pytest.raises(ValueError) as e:
        load_pretrained(other, small.state_dict())
    msg = str(e.value)
    assert "43 shape mismatches, 0 missing, 12 unexpected" in msg  # depth 4 vs 3: 12 params of blocks.3
    assert "shape mismatch for blocks.0.attn.qkv.weight: checkpoint (576, 192) vs model (288, 96)" in msg


def test_model_runs_at_another_resolution():
    torch.manual_seed(0)
    m32 = mae_vit_tiny(img_size=32, patch_size=4, norm_pix_loss=True)
    m48 = mae_vit_tiny(img_size=48, patch_size=4, norm_pix_loss=True)
    load_pretrained(m48, m32.state_dict())  # pos tables regenerated for the 12x12 grid
    x = torch.randn(2, 3, 48, 48)
    noise = torch.rand(2, 144)
    a = m32(x, 0.75, noise)
    b = m48(x, 0.75, noise)
    assert a[1].shape == (2, 144, 48)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    # A learned table is resized bicubically instead.
    vit = VisionTransformer(img_size=48, patch_size=4, embed_dim=192, depth=4, num_heads=3, learn_pos_embed=True)
    load_pretrained(vit, m32.state_dict())
    assert vit.pos_embed.shape == (1, 145, 192)
