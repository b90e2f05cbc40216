"""Linear probe, partial and full fine-tuning on the embedded digits; checkpoint sources; bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fastmae.eval import finetune, linprobe
from fastmae.eval.data import load_digits_split
from fastmae.eval.models import DIGITS_ARCH
from fastmae.eval.protocol import EvalConfig, run_eval
from fastmae.models.mae import mae_vit_tiny

SMALL = dict(DIGITS_ARCH, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(16, 1)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A (untrained) full MAE checkpoint in the fastmae format, with its architecture recorded."""
    torch.manual_seed(0)
    m = mae_vit_tiny(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2, pixel_mean=(0.5,), pixel_std=(0.5,))
    path = tmp_path_factory.mktemp("ckpt") / "mae.pt"
    torch.save({"model": m.state_dict(), "arch": SMALL, "config": {"model": "custom"}}, path)
    return path


def test_linear_probe_beats_chance_by_far(digits):
    cfg = linprobe.LinprobeConfig.from_flat(epochs=30, output_dir="", quiet=True)
    r = run_eval(cfg, split=digits)  # random-init digits encoder
    assert r["chance"] == pytest.approx(0.1)
    assert r["top1"] == r["top1_last"] > 0.6, r  # no validation split: the last epoch is the headline
    assert r["n_val"] == len(digits.test_y) and r["history"][-1]["val_n"] == len(digits.test_y)


def test_linprobe_cli_writes_its_files(tmp_path, mae_ckpt, capsys):
    out = tmp_path / "lp"
    rc = linprobe.main([f"--ckpt={mae_ckpt}", "--epochs=2", f"--output_dir={out}", "--quiet=true"])
    assert rc == 0, capsys.readouterr().err
    for f in ("config.json", "metrics.jsonl", "results.json", "checkpoint-last.pt"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_top1" in r] == [0, 1]
    assert json.loads((out / "config.json").read_text())["protocol"]["tune_blocks"] == 0
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)
    src = torch.load(mae_ckpt, weights_only=True)["model"]
    # frozen encoder: every encoder weight is unchanged, the BN + linear head is new
    for k, v in ck["model"].items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "norm.")):
            torch.testing.assert_close(v, src[k], rtol=0, atol=0)
    assert "head.0.running_mean" in ck["model"] and "head.1.weight" in ck["model"]


def test_partial_finetune_trains_only_the_last_blocks(tmp_path, mae_ckpt, capsys):
    out = tmp_path / "ft1"
    rc = finetune.main([f"--ckpt={mae_ckpt}", "--tune_blocks=1", "--epochs=1", "--learn_pos_embed=true",
                        f"--output_dir={out}", "--quiet=true"])
    assert rc == 0, capsys.readouterr().err
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)["model"]
    src = torch.load(mae_ckpt, weights_only=True)["model"]
    changed = {k for k in ck if k in src and not torch.equal(ck[k], src[k])}
    assert changed and all(k.startswith(("blocks.1.", "norm.")) for k in changed), changed
    assert not any(k.startswith(("blocks.0.", "patch_embed.", "cls_token")) for k in changed)


def test_full_finetune_with_mixup_global_pool_from_official_encoder_only(tmp_path, capsys):
    torch.manual_seed(0)
    # named like the official tiny model (3 heads), made narrow and shallow for CI
    m = mae_vit_tiny(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=1, decoder_embed_dim=16,
                     decoder_depth=1, pixel_mean=(0.5,), pixel_std=(0.5,))
    enc = {k: v for k, v in m.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "official_encoder.pth"
    torch.save({"model": enc, "args": argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True)}, path)
    out = tmp_path / "ft"
    rc = finetune.main([f"--ckpt={path}", "--epochs=1", "--mixup=0.8", "--cutmix=1.0", "--global_pool=true",
                        "--batch_size=64", "--learn_pos_embed=true", f"--output_dir={out}", "--quiet=true"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["arch"]["num_heads"] == 3 and res["arch"]["embed_dim"] == 24  # heads from the official model name
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)["model"]
    assert "fc_norm.weight" in ck and "norm.weight" not in ck
    assert not torch.equal(ck["pos_embed"], enc["pos_embed"])  # learned in full fine-tuning
    assert not torch.equal(ck["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])


def test_finetune_tune_blocks_zero_is_the_linear_probe(tmp_path, capsys):
    out = tmp_path / "k0"
    rc = finetune.main(["--tune_blocks=0", "--epochs=1", f"--output_dir={out}", "--quiet=true", "--embed_dim=32",
                        "--depth=2", "--num_heads=2"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["protocol"]["tune_blocks"] == 0 and cfg["optim"]["blr"] == linprobe.LinprobeConfig().optim.blr


def test_wrong_architecture_names_the_keys(tmp_path, mae_ckpt, capsys):
    rc = linprobe.main([f"--ckpt={mae_ckpt}", "--depth=3", f"--output_dir={tmp_path}", "--epochs=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error: checkpoint does not fit VisionTransformer (0 shape mismatches, 12 missing")
    assert "missing in checkpoint: blocks.2.attn.qkv.weight (96, 32)" in err
    rc = linprobe.main([f"--ckpt={mae_ckpt}", "--embed_dim=48", f"--output_dir={tmp_path}", "--epochs=1"])
    assert rc == 2
    assert "shape mismatch for cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in capsys.readouterr().err


def _folder(root, counts):
    from PIL import Image

    for split in ("train", "val"):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), color=(20 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return root


RGB = ["--in_chans=3", "--num_workers=0", "--progress=false"]


def test_one_class_dataset(tmp_path, capsys):
    data = _folder(tmp_path / "one", {"cat": 6})
    rc = linprobe.main([f"--data={data}", *RGB, "--batch_size=2", f"--output_dir={tmp_path / 'o'}"])
    assert rc == 2
    assert "a classifier needs at least 2" in capsys.readouterr().err


def test_too_few_images_for_the_batch(tmp_path, capsys):
    data = _folder(tmp_path / "few", {"a": 4, "b": 4})
    rc = linprobe.main([f"--data={data}", *RGB, "--batch_size=64", f"--output_dir={tmp_path / 'o'}"])
    assert rc == 2
    assert "give no full batch" in capsys.readouterr().err


def test_data_root_needs_both_splits(tmp_path, capsys):
    (tmp_path / "flat" / "a").mkdir(parents=True)
    rc = finetune.main([f"--data={tmp_path / 'flat'}", *RGB, f"--output_dir={tmp_path / 'o'}"])
    assert rc == 2
    assert "needs train/ and val/" in capsys.readouterr().err


def test_bad_config_is_one_line(tmp_path, capsys):
    assert finetune.main(["--tune_blockz=1"]) == 2
    assert capsys.readouterr().err.strip().startswith("fastmae: error: unknown config key --tune_blockz")
    assert finetune.main(["--mixup=0.8", "--tune_blocks=1", f"--output_dir={tmp_path}"]) == 2
    assert "full fine-tuning" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be even"):
        EvalConfig.from_flat(mixup=0.5, batch_size=7).validate()
