"""The encoder with nothing masked equals timm's VisionTransformer on the same weights."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from fastmae import mae_vit_tiny  # noqa: E402
from fastmae.convert import encoder_state_dict, save_timm_encoder  # noqa: E402


def _timm_twin(m):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=m.patch_embed.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
        depth=len(m.blocks), num_heads=m.blocks[0].attn.num_heads, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
    ).eval()


@pytest.mark.parametrize("kw", [dict(img_size=32, patch_size=4), dict(img_size=56, patch_size=14, in_chans=1,
                                                                         pixel_mean=(0.5,), pixel_std=(0.5,))])
def test_encoder_equals_timm_forward_features(kw, tmp_path):
    torch.manual_seed(0)
    m = mae_vit_tiny(**kw).eval()
    ref = _timm_twin(m)
    ref.load_state_dict(encoder_state_dict(m.state_dict()), strict=True)
    x = torch.randn(2, m.in_chans, m.patch_embed.img_size[0], m.patch_embed.img_size[1])
    with torch.no_grad():
        expected = ref.forward_features(x)
        # All patches, in natural order.
        torch.testing.assert_close(m.forward_features(x), expected, rtol=1e-5, atol=1e-5)
        # mask_ratio 0 with noise: every patch kept, in noise order; undo the permutation.
        L = m.patch_embed.num_patches
        noise = torch.rand(2, L)
        latent, mask, ids_restore = m.forward_encoder(x, 0.0, noise)
        assert mask.sum() == 0
        unshuffled = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
        torch.testing.assert_close(unshuffled, expected[:, 1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(latent[:, 0], expected[:, 0], rtol=1e-5, atol=1e-5)

    # The safetensors export loads into timm strictly.
    from safetensors.torch import load_file

    save_timm_encoder(m, tmp_path / "enc.safetensors")
    twin = _timm_twin(m)
    twin.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)
