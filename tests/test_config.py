"""Config presets, overrides and the learning-rate schedule and parameter groups of the official recipe."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from fastmae import mae_vit_tiny
from fastmae.config import SECTIONS, PretrainConfig, flat_config, parse_overrides, pretrain_presets
from fastmae.engine.optim import lr_at, param_groups
from fastmae.flags import unique_keys
from fastmae.methods import get_method, list_methods
from fastmae.methods.crossmae import CrossMAEConfig
from fastmae.methods.mae import MAEConfig
from fastmae.methods.registry import MethodConfig


def test_presets_and_overrides():
    cfg = parse_overrides(["--preset=base", "--epochs=2", "--compile", "false", "--blr=1e-4"])
    assert cfg.model.name == "mae_vit_base_patch16" and cfg.data.img_size == 224
    assert cfg.schedule.epochs == 2 and cfg.step.compile is False and cfg.optim.blr == 1e-4
    assert cfg.optim.batch_size * cfg.optim.accum_iter * 8 == 4096  # the official effective batch on 8 GPUs
    for name in pretrain_presets():
        parse_overrides([f"--preset={name}"])


def test_official_recipe_values():
    b = parse_overrides(["--preset=base"])
    assert (b.optim.blr, b.optim.weight_decay, b.optim.beta1, b.optim.beta2, b.model.mask_ratio, b.model.norm_pix_loss) == (
        1.5e-4, 0.05, 0.9, 0.95, 0.75, True)
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


# ---- issue 23 item 3: config in nested typed sections --------------------------------------------------------------

# A crossmae run's config.json as `fastmae pretrain` wrote it before the sections (main at dfbb0d7, flat keys,
# tri-state feature_fusion "false", every method's keys): the layout of older run folders and checkpoints.
FLAT_FIXTURE = Path(__file__).parent / "fixtures" / "flat_config_before_sections.json"


def test_sections_are_read_by_path_and_every_spelling_lands_in_the_same_field():
    flat = parse_overrides(["--blr=0.002", "--input_size=32", "--data=/x", "--no_norm_pix_loss", "--mask_type=block"])
    dotted = parse_overrides(["--optim.blr=0.002", "--data.img_size=32", "--data.path=/x", "--model.norm_pix_loss=false",
                              "--method.mask_type=block"])
    assert flat == dotted
    assert (flat.optim.blr, flat.data.img_size, flat.data.path, flat.model.norm_pix_loss) == (0.002, 32, "/x", False)
    assert isinstance(flat.method, MAEConfig) and (flat.method.name, flat.method.mask_type) == ("mae", "block")
    assert not hasattr(flat, "blr") and not hasattr(flat.optim, "img_size")
    assert set(SECTIONS) <= {f.name for f in fields(PretrainConfig)}


def test_config_json_is_nested_and_reads_back(tmp_path):
    cfg = parse_overrides(["--method=crossmae", "--feature_fusion=false", "--decoder_depth=2", "--output_dir=runs/x"])
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert set(SECTIONS) <= set(data) and data["optim"]["blr"] == cfg.optim.blr
    assert data["method"] == {"name": "crossmae", "mask_type": "random", "decoder_embed_dim": 0, "decoder_depth": 2,
                              "decoder_num_heads": 0, "prediction_ratio": 0.0, "feature_fusion": False}
    assert parse_overrides([f"--config={tmp_path / 'config.json'}"]) == cfg


def test_a_flat_config_json_from_before_the_sections_still_runs():
    old = json.loads(FLAT_FIXTURE.read_text())
    cfg = parse_overrides([f"--config={FLAT_FIXTURE}"])
    assert isinstance(cfg.method, CrossMAEConfig) and cfg.method.feature_fusion is False and cfg.method.decoder_depth == 2
    assert (cfg.optim.blr, cfg.step.cuda_graphs, cfg.output_dir, cfg.data.path) == (0.002, "auto", "runs/old-crossmae", "demo")
    # The MAE-only keys the flat file holds (loss_on, ...) did nothing in a CrossMAE run: dropped, not refused.
    assert not hasattr(cfg.method, "loss_on")
    new, stored = cfg.flat(), flat_config(old)
    # every key the old file holds keeps its value; keys added since take their defaults
    assert {k: v for k, v in stored.items() if k in new} == {k: new[k] for k in stored if k in new}
    assert set(new) - set(stored) <= {"ckpt_format", "dali_decode"}
    assert stored["feature_fusion"] is False and flat_config({**old, "feature_fusion": ""})["feature_fusion"] is None


def test_resume_checks_read_a_flat_checkpoint_config():
    from fastmae.pretrain import learning_problem_changes

    old = json.loads(FLAT_FIXTURE.read_text())
    cfg = parse_overrides([f"--config={FLAT_FIXTURE}"])
    assert learning_problem_changes(cfg, flat_config(old)) == []
    # The old tri-state "" (the model's default) is the new None: not a change of the learning problem.
    default_fusion = parse_overrides([f"--config={FLAT_FIXTURE}", "--feature_fusion=none"])
    assert learning_problem_changes(default_fusion, flat_config({**old, "feature_fusion": ""})) == []
    with pytest.raises(ValueError, match="mask_ratio 0.75 -> 0.5 changes what the run learns"):
        learning_problem_changes(parse_overrides([f"--config={FLAT_FIXTURE}", "--mask_ratio=0.5"]), flat_config(old))


def test_a_key_of_another_method_is_refused_in_one_line():
    with pytest.raises(ValueError) as e:
        parse_overrides(["--method=simmim", "--num_frames=8"])
    assert str(e.value) == "--num_frames is a key of --method=videomae; --method=simmim does not take it"
    with pytest.raises(ValueError, match=r"^--mask_type is a key of --method=crossmae / mae; --method=simmim does not"):
        parse_overrides(["--method=simmim", "--method.mask_type=block"])
    for name in list_methods():  # each method declares its keys; the method section is that dataclass
        assert issubclass(get_method(name).config, MethodConfig)
        assert type(parse_overrides([f"--method={name}"]).method) is get_method(name).config


def test_booleans_are_booleans():
    fusion = [parse_overrides(["--method=crossmae", *a]).method.feature_fusion
              for a in ([], ["--feature_fusion=true"], ["--feature_fusion=false"], ["--feature_fusion=none"],
                        ["--feature_fusion"], ["--no_feature_fusion"])]
    assert fusion == [None, True, False, None, True, False]
    assert parse_overrides(["--compile=true", "--tensorboard=false"]).step.compile is True
    for key in unique_keys(PretrainConfig):  # a key documented as true | false is typed as a boolean
        if "true | false" in key.help:
            assert key.typ is bool or set(typing.get_args(key.typ)) == {bool, type(None)}, key.flat


def test_a_constraint_has_one_owner(monkeypatch):
    """The config and the layers raise the same check from the same function (patched here: both see the patch)."""
    from fastmae.layers import Attention, PatchEmbed, attention, patch_embed

    with pytest.raises(ValueError, match="^decoder_embed_dim 100 is not divisible by decoder_num_heads 16$"):
        parse_overrides(["--decoder_embed_dim=100", "--decoder_num_heads=16"])
    with pytest.raises(ValueError, match="^img_size 30 is not divisible by the patch size 4$"):
        parse_overrides(["--img_size=30", "--patch_size=4"])

    def owner(*args, **kwargs):
        raise RuntimeError("the one owner")

    monkeypatch.setattr(attention, "check_heads", owner)
    monkeypatch.setattr(patch_embed, "check_patch_grid", owner)
    for build in (lambda: parse_overrides(["--decoder_embed_dim=100", "--decoder_num_heads=16"]), lambda: Attention(100, 16),
                  lambda: parse_overrides(["--img_size=30", "--patch_size=4"]), lambda: PatchEmbed(30, 4)):
        with pytest.raises(RuntimeError, match="the one owner"):
            build()
