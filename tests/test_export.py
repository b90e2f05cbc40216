"""`fastmae export`: the written folders load in transformers and timm (offline) and give fastmae's features."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from fastmae import mae_vit_tiny  # noqa: E402
from fastmae.convert import encoder_state_dict  # noqa: E402
from fastmae.export import ExportConfig, export, main  # noqa: E402

S, P = 32, 4
L = (S // P) ** 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MAE with non-trivial weights, saved as a fastmae pretraining checkpoint."""
    torch.manual_seed(0)
    model = mae_vit_tiny(img_size=S, patch_size=P).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-00000010.pt"
    torch.save({"model": model.state_dict(), "step": 10,
                "config": {"model": "mae_vit_tiny", "img_size": S, "patch_size": P, "mask_ratio": 0.75}}, path)
    return model, path


def _x():
    return torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))


def test_hf_folder_loads_in_both_classes_and_matches(trained, tmp_path):
    model, ckpt = trained
    out = tmp_path / "hf"
    r = export(ExportConfig(ckpt=str(ckpt), output_dir=str(out), format="hf"))
    assert r["class"] == "ViTMAEForPreTraining"
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    x = _x()
    ordered = torch.arange(L, dtype=torch.float32).expand(2, L)  # identity shuffle: patches in natural order
    enc = transformers.ViTMAEModel.from_pretrained(out, mask_ratio=0.0).eval()
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = enc(pixel_values=x, noise=ordered).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    full = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
    assert full.config.mask_ratio == 0.75 and full.config.norm_pix_loss == model.norm_pix_loss
    noise = torch.rand(2, L, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, mask = model(x, mask_ratio=0.75, noise=noise)
        hf_out = full(pixel_values=x, noise=noise)
    torch.testing.assert_close(hf_out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_out.loss, loss, rtol=1e-5, atol=1e-5)


def test_hf_encoder_only_checkpoint(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "enc.pth"
    torch.save({"model": encoder_state_dict(model.state_dict()), "config": {"model": "mae_vit_tiny"}}, ckpt)
    out = tmp_path / "hf"
    assert export(ExportConfig(ckpt=str(ckpt), output_dir=str(out), format="hf"))["class"] == "ViTMAEModel"
    enc = transformers.ViTMAEModel.from_pretrained(out, mask_ratio=0.0).eval()
    x = _x()
    with torch.no_grad():
        theirs = enc(pixel_values=x, noise=torch.arange(L, dtype=torch.float32).expand(2, L)).last_hidden_state
        torch.testing.assert_close(theirs, model.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_folder_loads_by_local_dir_and_by_file(trained, tmp_path):
    model, ckpt = trained
    out = tmp_path / "timm"
    r = export(ExportConfig(ckpt=str(ckpt), output_dir=str(out), format="timm"))
    x = _x()
    with torch.no_grad():
        ours = model.forward_features(x)
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
        torch.testing.assert_close(by_dir.forward_features(x), ours, rtol=1e-5, atol=1e-5)
        by_file = timm.create_model(r["name"], pretrained=True, pretrained_cfg_overlay=dict(file=r["file"]),
                                    num_classes=0, **r["model_args"]).eval()
        torch.testing.assert_close(by_file.forward_features(x), ours, rtol=1e-5, atol=1e-5)
        # A classifier on top: the encoder loads, the head is fresh.
        clf = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=7).eval()
        torch.testing.assert_close(clf.forward_features(x), ours, rtol=1e-5, atol=1e-5)
        assert clf(x).shape == (2, 7)
    assert by_dir.pretrained_cfg["mean"] == pytest.approx(model.pixel_mean.tolist())


def test_cli_writes_and_reports_bad_input(trained, tmp_path, capsys):
    _, ckpt = trained
    assert main([f"--ckpt={ckpt}", f"--output_dir={tmp_path / 'x'}", "--format=timm"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert main([f"--ckpt={ckpt}", f"--output_dir={tmp_path / 'y'}", "--format=onnx"]) == 2
    assert "format must be one of" in capsys.readouterr().err
    assert main([f"--ckpt={tmp_path / 'missing.pt'}", f"--output_dir={tmp_path / 'z'}"]) == 2


def test_a_run_folder_stands_for_its_latest_checkpoint(trained, tmp_path):
    import shutil

    from fastmae.convert import read_checkpoint

    _, ckpt = trained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint-00000010.pt")
    torch.save({"model": {}, "step": 20}, run / "checkpoint-00000020.pt")
    assert read_checkpoint(run)["step"] == 20
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path)
