"""Evaluation at scale, on this machine: streamed class folders and tar shards, a pretrained checkpoint,
distributed evaluation (2 gloo ranks == 1 rank), exact resume, and memory that does not grow with the data.

The data is real photos: fastmae.data's demo set (crops of scikit-image / scikit-learn / matplotlib photos,
train/ and val/ cut from disjoint regions), one validation image removed so the ranks' shares are uneven.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastmae.eval import finetune, linprobe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
COMMON = ["--num_workers=0", "--progress=false", "--quiet=true", "--batch_size=16", "--eval_batch_size=7"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from fastmae.data import prepare_demo_dataset

    root = prepare_demo_dataset(tmp_path_factory.mktemp("photos"))
    val = sorted((root / "val").rglob("*.jpg"))
    val[0].unlink()  # an odd number of validation images: the ranks' shards differ in size
    return root


def _count(split: Path) -> int:
    return sum(1 for _ in split.rglob("*.jpg"))


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    """The same images as webdataset tar shards (key.jpg + key.cls), two shards per split."""
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        classes = sorted(d.name for d in (tree / split).iterdir())
        files = sorted((tree / split).rglob("*.jpg"))
        (out / split).mkdir()
        for s in range(2):
            with tarfile.open(out / split / f"{split}-{s:06d}.tar", "w") as tf:
                for i, f in enumerate(files[s::2]):
                    key = f"s{s}_{i:05d}"
                    tf.add(f, arcname=f"{key}.jpg")
                    cls = out / f"{key}.cls"
                    cls.write_text(str(classes.index(f.parent.name)))
                    tf.add(cls, arcname=f"{key}.cls")
                    cls.unlink()
    return out


@pytest.fixture(scope="module")
def pretrained(tree, tmp_path_factory) -> Path:
    """A real (2-step) MAE pretraining checkpoint of fastmae.pretrain at 32 px."""
    from fastmae.pretrain import main

    out = tmp_path_factory.mktemp("pretrain")
    main(["--preset=tiny", f"--data={tree}", "--img_size=32", "--max_steps=2", "--batch_size=16", "--num_workers=0",
          "--progress=false", f"--output_dir={out}", "--ckpt_every=2", "--num_vis=2"])
    return next(out.glob("checkpoint-*.pt"))


@pytest.mark.parametrize("source", ["folder", "tar"])
@pytest.mark.parametrize("protocol", ["finetune", "linprobe"])
def test_one_epoch_from_a_pretrained_checkpoint(tree, shards, pretrained, tmp_path, source, protocol, capsys):
    data = [f"--data={tree}"] if source == "folder" else [
        f"--train_data={shards}/train/train-{{000000..000001}}.tar", f"--val_data={shards}/val"]
    out = tmp_path / "run"
    main = finetune.main if protocol == "finetune" else linprobe.main
    extra = ["--mixup=0.8", "--cutmix=1.0", "--global_pool=true"] if protocol == "finetune" else []
    rc = main([f"--ckpt={pretrained}", *data, "--epochs=1", *COMMON, *extra, f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    assert "top-1" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    n_val = _count(tree / "val")
    assert res["n_val"] == n_val and res["history"][-1]["val_n"] == n_val  # every image once
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and res["top1"] == res["top1_last"]
    assert res["arch"]["img_size"] == 32 and res["arch"]["num_heads"] == 3  # read from the pretraining config
    assert res["data"] == f"{source} stream"
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert len(ck["classes"]) == 10


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastmae.cli", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def test_two_gloo_ranks_score_like_one(tree, pretrained, tmp_path):
    # a 2-rank DDP fine-tuning epoch (gloo on CPU) ...
    run = tmp_path / "ddp"
    p = _torchrun(["finetune", f"--ckpt={pretrained}", f"--data={tree}", "--epochs=1", *COMMON, f"--output_dir={run}"], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    n_val = _count(tree / "val")
    assert res["n_val"] == n_val and res["history"][0]["val_n"] == n_val
    # ... then its classifier scored on 2 ranks and on 1: the same counts, every image exactly once
    scores = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        p = _torchrun(["finetune", "--eval_only=true", f"--ckpt={run}/checkpoint-last.pt", f"--data={tree}", *COMMON,
                       f"--output_dir={out}"], nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        scores[nproc] = json.loads((out / "results.json").read_text())
    assert scores[1]["n_val"] == scores[2]["n_val"] == n_val
    assert scores[1]["top1"] == scores[2]["top1"] and scores[1]["top5"] == scores[2]["top5"]
    # the distributed run's last-epoch score is the same classifier's
    assert res["top1_last"] == pytest.approx(scores[1]["top1"], abs=1e-9)


def test_resume_continues_exactly(tree, pretrained, tmp_path, capsys):
    args = [f"--ckpt={pretrained}", f"--data={tree}", "--epochs=2", *COMMON, "--mixup=0.8", "--cutmix=1.0"]
    full = tmp_path / "full"
    assert finetune.main([*args, f"--output_dir={full}"]) == 0
    cut = tmp_path / "cut"
    # stop after epoch 1's checkpoint (epochs=1 uses another schedule, so cut the run by deleting the end)
    assert finetune.main([*args, f"--output_dir={cut}", "--ckpt_every=7"]) == 0
    ckpts = sorted(cut.glob("checkpoint-0*.pt"))
    for c in ckpts[1:]:
        c.unlink()
    (cut / "results.json").unlink()
    resumed = ckpts[0].name
    assert finetune.main([*args, f"--output_dir={cut}", "--ckpt_every=7", "--resume=auto"]) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]], resumed
    sa = torch.load(full / "checkpoint-last.pt", weights_only=True)["model"]
    sb = torch.load(cut / "checkpoint-last.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


_RSS = """
import resource, sys
from fastmae.eval import finetune
rc = finetune.main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def _jpeg_tree(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 20)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / f"c{i % 2}" / f"{i:05d}.jpg", quality=50)
    return root


def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """200 vs 2,000 JPEGs at 64 px: holding them decoded would add >= 1,800 x 3 x 64 x 64 x 4 B = 88 MB."""
    rss = {}
    for n in (200, 2000):
        data = _jpeg_tree(tmp_path / f"d{n}", n)
        args = [f"--data={data}", "--in_chans=3", "--img_size=64", "--patch_size=16", "--epochs=1", "--num_workers=0",
                "--batch_size=50", "--eval_batch_size=50", "--progress=false", "--quiet=true", "--save_ckpt=false",
                f"--output_dir={tmp_path / f'o{n}'}"]
        p = subprocess.run([sys.executable, "-c", _RSS, *args], env=ENV, capture_output=True, text=True, timeout=600)
        line = [x for x in p.stdout.splitlines() if x.startswith("MAXRSS_KB")]
        assert line and line[0].endswith(" 0"), p.stderr[-2000:]
        rss[n] = int(line[0].split()[1]) / 1024
    assert rss[2000] - rss[200] < 30, rss
