"""Reconstruction grids from a checkpoint (seeded or given mask), and the demo command end to end (tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.eval import demo, visualize
from fastmae.eval.models import DIGITS_ARCH
from fastmae.eval.pretrain_digits import tiny_digits_model
from fastmae.reference import random_masking

SMALL = dict(DIGITS_ARCH, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = tiny_digits_model(SMALL, decoder_dim=32, decoder_depth=1, norm_pix_loss=True)
    path = tmp_path_factory.mktemp("vis") / "mae.pt"
    torch.save({"model": m.state_dict(), "arch": SMALL,
                "decoder": {"decoder_num_heads": 4, "norm_pix_loss": True}}, path)
    return path


@pytest.mark.parametrize("shape", [(16,), (4, 4), (3, 16)])
def test_given_mask_is_reproduced_exactly(shape):
    L, n = 16, 3
    rng = np.random.default_rng(0)
    rows = np.zeros((n, L), dtype=np.int64)
    for r in rows:
        r[rng.choice(L, 11, replace=False)] = 1
    mask = torch.from_numpy(rows[0].reshape(shape) if len(shape) < 2 or shape[0] != n else rows)
    noise, ratio = visualize.mask_to_noise(mask, n, L)
    len_keep = int(L * (1 - ratio))
    _, _, got, _ = random_masking(noise, len_keep)
    want = torch.from_numpy(rows if shape == (n, L) else np.broadcast_to(rows[0], (n, L)).copy()).float()
    torch.testing.assert_close(got, want)


def test_mask_errors():
    with pytest.raises(ValueError, match="same number of removed patches"):
        visualize.mask_to_noise(torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]]), 2, 4)
    with pytest.raises(ValueError, match="removes every patch"):
        visualize.mask_to_noise(torch.ones(4), 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        visualize.mask_to_noise(torch.zeros(5), 2, 4)


def test_visualize_cli_seed_and_mask(tmp_path, mae_ckpt, capsys):
    out = tmp_path / "rec.png"
    assert visualize.main([f"--ckpt={mae_ckpt}", "--num_images=3", f"--output={out}"]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 500
    mask = np.zeros((4, 4), dtype=np.int64)
    mask[:2] = 1
    np.save(tmp_path / "m.npy", mask)
    out2 = tmp_path / "rec_mask.png"
    rc = visualize.main([f"--ckpt={mae_ckpt}", f"--mask={tmp_path / 'm.npy'}", "--num_images=2", f"--output={out2}"])
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    img = np.asarray(Image.open(out2))
    assert img.shape[0] > 4 * (2 * (16 + 2) + 2)  # 2 rows at scale 4, plus the column names and the caption
    import json

    assert len(json.loads(out2.with_suffix(".json").read_text())["rows"]) == 2


def test_visualize_needs_a_decoder(tmp_path, mae_ckpt, capsys):
    sd = torch.load(mae_ckpt, weights_only=True)
    enc = {k: v for k, v in sd["model"].items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc, "arch": SMALL}, tmp_path / "enc.pt")
    assert visualize.main([f"--ckpt={tmp_path / 'enc.pt'}", f"--output={tmp_path / 'x.png'}"]) == 2
    assert "no decoder weights" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", [True, False])
def test_crossmae_checkpoint_is_rebuilt_and_decodes_every_removed_patch(tmp_path, capsys, fusion):
    from fastmae.eval.models import read_source

    torch.manual_seed(0)
    m = tiny_digits_model(SMALL, decoder_dim=32, decoder_depth=2, method="crossmae", feature_fusion=fusion).eval()
    path = tmp_path / "cross.pt"
    torch.save({"model": m.state_dict(), "arch": SMALL, "decoder": {"decoder_num_heads": 4, "norm_pix_loss": False}},
               path)
    sd, meta = read_source(str(path))
    rebuilt = visualize.build_mae(sd, meta, visualize.VisualizeConfig(ckpt=str(path))).eval()
    assert type(rebuilt).__name__ == "CrossMAE" and (rebuilt.decoder_fusion is not None) == fusion
    x, noise = torch.randn(3, 1, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        _, want, mask = m(x, 0.75, noise)
        _, got, _ = rebuilt(x, 0.75, noise)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # eval mode decodes every removed patch (12 of 16), not the training subset (4), and nothing else
    assert torch.equal(got.abs().sum(-1) > 0, mask.bool()) and int(mask[0].sum()) == 12
    out = tmp_path / "r.png"
    assert visualize.main([f"--ckpt={path}", "--num_images=2", f"--output={out}"]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 500


def test_demo_smoke_writes_the_table(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--preset=smoke", f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    table = (out / "results.md").read_text()
    assert "| linear probe |" in table and "| partial fine-tune (last block) |" in table and "| full fine-tune |" in table
    for f in ("mae_pretrained.pt", "reconstructions.png", "analyze/attention_stats.png", "analyze/attention_stats.csv",
              "mae_linear/checkpoint-last.pt", "random_full/checkpoint-last.pt", "config.json"):
        assert (out / f).is_file(), f
    assert "mae+finetuned" in (out / "analyze/attention_stats.csv").read_text()
    assert "chosen on a validation split carved from the training split" in table and "best" not in table


def test_simmim_checkpoint_shows_cell_masks_and_its_pixel_head(tmp_path, capsys):
    from fastmae.methods.simmim import SimMIMViT
    from fastmae.reference import unpatchify
    from fastmae.viz import reconstruct

    torch.manual_seed(0)
    arch = dict(SMALL, num_heads=2)
    m = SimMIMViT(mask_patch_size=8, **arch, pixel_mean=(0.5,), pixel_std=(0.5,))
    # a pretraining checkpoint names the model; heads and cell size come from the config
    path = tmp_path / "simmim.pt"
    torch.save({"model": m.state_dict(), "arch": arch, "config": {"model": "simmim_vit_tiny", "mask_patch_size": 8}}, path)
    out = tmp_path / "simmim.png"
    assert visualize.main([f"--ckpt={path}", "--num_images=2", f"--output={out}"]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 500
    cfg = visualize.VisualizeConfig(ckpt=str(path))
    sd = torch.load(path, weights_only=True)
    model = visualize.build_simmim(sd["model"], sd, cfg)
    assert model.mask_patch_size == 8 and model.blocks[0].attn.num_heads == 2
    imgs = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, 4)  # 2 x 2 cells of 8 px
    panels = reconstruct(model, imgs, 0.5, noise)
    mask = panels["mask"][:, 0]
    # whole 8-px cells, 2 of the 4 masked in every image
    cells = mask.reshape(2, 2, 8, 2, 8)
    assert torch.equal(cells.amax(dim=(2, 4)), cells.amin(dim=(2, 4))) and (cells[:, :, 0, :, 0].sum((1, 2)) == 2).all()
    with torch.no_grad():
        _, pred, _ = model(imgs, mask_ratio=0.5, noise=noise)
    head = unpatchify(pred.float(), 4, 1, (4, 4))  # SimMIM predicts the normalized pixels themselves
    torch.testing.assert_close(panels["reconstruction"], head)
    torch.testing.assert_close(panels["pasted"], torch.where(panels["mask"] > 0, head, imgs))
    assert visualize.main([f"--ckpt={path}", f"--mask={tmp_path / 'm.npy'}", f"--output={out}"]) == 2
    assert "SimMIM masks whole cells" in capsys.readouterr().err
