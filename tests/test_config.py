"""Config presets, overrides and the learning-rate schedule and parameter groups of the official recipe."""

from __future__ import annotations

import math

import pytest

from fastmae import mae_vit_tiny
from fastmae.config import PretrainConfig, parse_overrides, pretrain_presets
from fastmae.engine.optim import lr_at, param_groups


def test_presets_and_overrides():
    cfg = parse_overrides(["--preset=base", "--epochs=2", "--compile", "false", "--blr=1e-4"])
    assert cfg.model.name == "mae_vit_base_patch16" and cfg.data.img_size == 224
    assert cfg.schedule.epochs == 2 and cfg.step.compile is False and cfg.optim.blr == 1e-4
    assert cfg.optim.batch_size * cfg.optim.accum_iter * 8 == 4096  # the official effective batch on 8 GPUs
    for name in pretrain_presets():
        parse_overrides([f"--preset={name}"])


def test_official_recipe_values():
    b = parse_overrides(["--preset=base"])
    assert (b.optim.blr, b.optim.weight_decay, b.optim.beta1, b.optim.beta2, b.model.mask_ratio, b.model.norm_pix_loss) == (1.5e-4, 0.05, 0.9, 0.95, 0.75, True)
    assert (b.schedule.epochs, b.schedule.warmup_epochs) == (800, 40)
    assert parse_overrides(["--preset=huge"]).model.name == "mae_vit_huge_patch14"


def test_unknown_key_suggests():
    with pytest.raises(ValueError, match="unknown config key --batchsize"):
        parse_overrides(["--batchsize=3"])


def test_lr_schedule_warmup_then_half_cosine():
    spe, warm, epochs, base, lo = 10, 2.0, 10.0, 1.0, 0.1
    assert lr_at(0, spe, warm, epochs, base, lo) == 0.0
    assert lr_at(10, spe, warm, epochs, base, lo) == pytest.approx(0.5)  # mid-warmup, per iteration
    assert lr_at(20, spe, warm, epochs, base, lo) == pytest.approx(1.0)
    assert lr_at(60, spe, warm, epochs, base, lo) == pytest.approx(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, spe, warm, epochs, base, lo) == pytest.approx(lo)


def test_no_weight_decay_on_biases_and_1d_params():
    m = mae_vit_tiny(img_size=32, patch_size=4)
    no_decay, decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert all(n.endswith(".bias") or "norm" in n for n in nd)
    assert "blocks.0.attn.qkv.weight" in d and "mask_token" in d and "cls_token" in d  # as the official recipe
    assert "pos_embed" not in d | nd  # fixed sin-cos: not trained
    assert d | nd == {n for n, p in m.named_parameters() if p.requires_grad}


def test_config_round_trips_to_json(tmp_path):
    cfg = PretrainConfig()
    cfg.save(tmp_path / "c.json")
    import json

    assert json.loads((tmp_path / "c.json").read_text())["model"]["name"] == cfg.model.name
