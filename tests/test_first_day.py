"""A new user's first run says what it did: held-out data, labelled pictures, curves, resume outcomes, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmae.data import build_loader
from fastmae.data.sources import holdout, open_source
from fastmae.pretrain import main

TINY = ["--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32",
        "--tensorboard=false", "--log_every=2"]


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    """A class-folder tree with no train/ or val/ split: 60 small photos-like images in 3 classes."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(20):
            base = rng.integers(0, 255, (1, 1, 3))
            img = np.clip(base + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i:02d}.jpg")
    return root


def test_holdout_is_seeded_disjoint_and_order_free(flat_folder):
    src = open_source(flat_folder, "train")
    train, val = holdout(src, 0.2, 0, "train"), holdout(src, 0.2, 0, "val")
    assert set(train.names).isdisjoint(val.names) and len(train) + len(val) == len(src)
    assert 3 <= len(val) <= 25
    assert holdout(src, 0.2, 0, "val").names == val.names
    assert holdout(src, 0.2, 1, "val").names != val.names
    with pytest.raises(ValueError, match="leaves no val images"):
        holdout(src, 1e-9, 0, "val")


def test_loader_without_val_split_holds_files_out_of_training(flat_folder):
    kw = dict(batch_size=4, img_size=32, num_workers=0, holdout_fraction=0.2)
    tr = build_loader(flat_folder, split="train", **kw)
    va = build_loader(flat_folder, split="val", train=False, **kw)
    assert tr.holdout_fraction == va.holdout_fraction == 0.2
    assert set(tr.source.names).isdisjoint(va.source.names)
    assert len(tr.source) + len(va.source) == 60


def test_first_run_reports_and_pictures(tmp_path, flat_folder, monkeypatch, capsys):
    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    s = main([f"--data={flat_folder}", f"--output_dir={out}", "--max_steps=4", "--epochs=2", "--warmup_epochs=2",
              "--holdout_fraction=0.2", "--num_vis=4", *TINY])
    text = capsys.readouterr().out
    assert "warning: warmup_epochs=2 >= epochs=2" in text
    assert s["val_source"].startswith("a seeded 20% of the training files, excluded from training")
    assert "a seeded 20% of the training files" in text and "held-out loss" in text
    assert (out / "curves.png").is_file() and s["curves"] == str(out / "curves.png")
    info = json.loads((out / "reconstructions.json").read_text())
    assert info["columns"] == ["original", "masked", "reconstruction", "recon + visible", "prediction only"]
    assert "ground-truth mean/std" in info["caption"]
    files = [r["file"] for r in info["rows"]]
    assert len(files) == 4 and all(f.startswith("class") for f in files)
    held = set(build_loader(flat_folder, split="val", batch_size=1, img_size=32, num_workers=0, train=False,
                            holdout_fraction=0.2).source.names)
    assert {str(flat_folder / f) for f in files} <= held  # pictures show held-out images only

    # Resuming the finished run: says so instead of printing None.
    again = main([f"--data={flat_folder}", f"--output_dir={out}", "--max_steps=4", "--epochs=2", "--warmup_epochs=2",
                  "--holdout_fraction=0.2", "--resume=auto", *TINY])
    assert again["status"] == "nothing to do" and again["step"] == 4
    assert "nothing to do: the run in" in capsys.readouterr().out
    # Resuming with a longer schedule: says what happens to it.
    main([f"--data={flat_folder}", f"--output_dir={out}", "--max_steps=6", "--epochs=3", "--warmup_epochs=2",
          "--holdout_fraction=0.2", "--resume=auto", *TINY])
    assert "resuming with epochs 2 -> 3, max_steps 4 -> 6" in capsys.readouterr().out
