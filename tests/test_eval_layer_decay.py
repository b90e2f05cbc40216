"""Layer-wise lr decay: every trainable parameter gets decay ** (L + 1 - layer) and the right weight decay."""

from __future__ import annotations

import pytest

from fastmae.eval.layer_decay import param_groups_layer_decay
from fastmae.models.vit import VisionTransformer


def _expected_layer(name: str, depth: int) -> int:
    # Written out by hand from the BEiT/MAE rule, independently of layer_decay.layer_id.
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
    groups = param_groups_layer_decay(model, wd, decay)
    seen = {}
    for g in groups:
        for name, p in zip(g["param_names"], g["params"], strict=True):
            assert name not in seen, f"{name} in two groups"
            seen[name] = (g["lr_scale"], g["weight_decay"], p)
    named = dict(model.named_parameters())
    assert set(seen) == set(named)
    for name, (scale, group_wd, p) in seen.items():
        assert p is named[name]
        assert scale == pytest.approx(decay ** (depth + 1 - _expected_layer(name, depth))), name
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert group_wd == (0.0 if no_wd else wd), name
    assert seen["head.weight"][0] == 1.0
    assert seen["cls_token"][0] == pytest.approx(decay ** (depth + 1))
    assert seen["blocks.0.attn.qkv.weight"][0] == pytest.approx(decay**depth)


def test_frozen_parameters_are_left_out():
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                              num_classes=3, pixel_mean=(0.5,), pixel_std=(0.5,))
    names = {n for g in param_groups_layer_decay(model, 0.05, 0.75) for n in g["param_names"]}
    assert "pos_embed" not in names  # the fixed sin-cos table
    assert "head.weight" in names


def test_bad_decay():
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                              pixel_mean=(0.5,), pixel_std=(0.5,))
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, 0.05, 1.5)
