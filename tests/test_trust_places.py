"""Issue 24, sections 3-4: resuming into another learning problem, and bad places and numbers on every command."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from run_helpers import TINY, one_error_line

from fastmae.pretrain import cli_main


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("two") / "run"
    assert cli_main([f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=2"]) == 0
    return out


@pytest.mark.parametrize("change", ["--mask_ratio=0.5", "--no_norm_pix_loss", "--mask_type=block"])
def test_resume_with_a_changed_learning_problem_is_refused_unless_allowed(change, two_steps, demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    before = (out / "config.json").read_text()
    argv = [f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=3", "--resume=auto", change]
    assert cli_main(argv) == 2
    key = change.removeprefix("--no_").removeprefix("--").split("=")[0]
    one_error_line(capsys.readouterr().err, key, "--allow_config_change")
    assert (out / "config.json").read_text() == before  # the refused resume left no trace
    assert cli_main([*argv, "--allow_config_change"]) == 0
    captured = capsys.readouterr()
    assert "learns a different problem" in captured.out + captured.err


BAD_NUMBERS = [("--device=gpu0", "device"), ("--device=cuda:abc", "device"), ("--threads=1000000000", "--threads"),
               ("--seed=" + str(10**30), "--seed"), ("--seed=-1", "seed")]


@pytest.mark.parametrize("flag,key", BAD_NUMBERS)
@pytest.mark.parametrize("command", ["pretrain", "visualize", "demo-eval", "sweep"])
def test_bad_device_threads_seed_on_every_command(command, flag, key, tmp_path, capsys):
    from fastmae.cli import main
    from fastmae.config import parse_overrides

    cls = {"pretrain": None, "visualize": "fastmae.eval.visualize:VisualizeConfig", "demo-eval": "fastmae.eval.demo:DemoConfig",
           "sweep": "fastmae.eval.sweep:SweepConfig"}[command]
    if cls is not None:
        import importlib
        import typing

        mod, name = cls.split(":")
        hints = typing.get_type_hints(getattr(importlib.import_module(mod), name))
        if flag[2:].split("=")[0] not in hints:
            pytest.skip(f"{command} has no {key}")
    assert main([command, flag, f"--output_dir={tmp_path}/o"] if command != "visualize" else
                [command, flag, f"--output={tmp_path}/o.png"]) == 2
    one_error_line(capsys.readouterr().err, key)
    del parse_overrides


def test_world_size_that_disagrees_with_the_launcher(tmp_path, demo_dir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli_main([f"--data={demo_dir}", f"--output_dir={tmp_path}/o", *TINY, "--max_steps=1", "--world_size=8"]) == 2
    one_error_line(capsys.readouterr().err, "--world_size=8", "WORLD_SIZE=1")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv_of", [
    lambda p: ["pretrain", f"--output_dir={p}"],
    lambda p: ["export", "--ckpt=x.pt", f"--out={p}"],
    lambda p: ["linprobe", f"--output_dir={p}"],
    lambda p: ["finetune", f"--output_dir={p}"],
    lambda p: ["sweep", f"--output_dir={p}"],
    lambda p: ["analyze", f"--output_dir={p}"],
])
def test_file_valued_and_read_only_output_on_every_command(argv_of, tmp_path, capsys, monkeypatch):
    from fastmae.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, needle in ((a_file, "is a file"), (a_file / "sub", "which is a file")):
        assert main(argv_of(target)) == 2
        one_error_line(capsys.readouterr().err, needle)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # The suite may run as root, for whom chmod does not stop writes: the check asks os.access, which we answer.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    assert main(argv_of(ro / "run")) == 2
    one_error_line(capsys.readouterr().err, "is not writable")


def test_visualize_output_that_is_a_folder(tmp_path, capsys):
    from fastmae.cli import main

    assert main(["visualize", f"--output={tmp_path}"]) == 2
    one_error_line(capsys.readouterr().err, "output", "is a folder")


def _planted_folder(demo_dir: Path, out: Path) -> tuple[str, str]:
    """A few demo images plus a JPEG with a damaged Huffman table (header and end marker intact: it passes the
    scan) and a 10k x 10k PNG (small on disk, a decompression bomb when decoded)."""
    from PIL import Image

    out.mkdir()
    jpgs = sorted(demo_dir.rglob("*.jpg"))[:22]
    for i, p in enumerate(jpgs):
        shutil.copy(p, out / f"img{i:02d}.jpg")
    data = bytearray(jpgs[0].read_bytes())
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # bogus Huffman code counts: only the decoder notices
    (out / "zz_corrupt.jpg").write_bytes(bytes(data))
    Image.new("L", (10000, 10000)).save(out / "zz_bomb.png", compress_level=1)
    return "zz_corrupt.jpg", "zz_bomb.png"


def _planted_tree(demo_dir: Path, data: Path) -> tuple[Path, tuple[str, str]]:
    """train/c0 = :func:`_planted_folder`, and a val/ split of its own: otherwise a seeded 5% of train/ (chosen by
    path) is held out and may hold a planted file."""
    (data / "train").mkdir(parents=True)
    names = _planted_folder(demo_dir, data / "train" / "c0")
    (data / "val" / "c0").mkdir(parents=True)
    for p in sorted(demo_dir.rglob("*.jpg"))[22:24]:
        shutil.copy(p, data / "val" / "c0" / p.name)
    return data, names


def test_substituted_samples_are_named_in_the_log_and_counted_in_the_summary(tmp_path, demo_dir, capsys):
    import json

    data, names = _planted_tree(demo_dir, tmp_path / "data")
    out = tmp_path / "run"
    steps = 9  # three epochs of 24 files at batch 8: every file is visited
    assert cli_main([f"--data={data}", f"--output_dir={out}", *TINY, f"--max_steps={steps}", "--ckpt_every=100"]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    substituted = summary["substituted_files"]
    assert sorted(Path(n).name for n in substituted) == sorted(names), summary
    assert summary["substitutions"] >= 2
    for name in substituted:
        assert f"substituted {name}" in captured.out  # named in the log when it happened
    assert "substituted      " in captured.out  # and in the summary text


def test_ddp_summary_counts_and_names_every_ranks_substitutions(tmp_path, demo_dir):
    """2 gloo ranks, each on its shard: the summary's substitutions are the sum over ranks, and every planted
    file is named, whichever rank met it."""
    import json
    import subprocess
    import sys

    data, names = _planted_tree(demo_dir, tmp_path / "data")
    out = tmp_path / "run"
    epochs = 2  # 24 files, 2 ranks x batch 4: 3 steps an epoch, every file visited once an epoch by one rank
    tiny = [a for a in TINY if not a.startswith("--batch_size")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={data}", f"--output_dir={out}", *tiny, "--batch_size=4", f"--max_steps={3 * epochs}",
           "--ckpt_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(n).name for n in summary["substituted_files"]) == sorted(names), summary
    # The torch loader counts every failed attempt: zz_bomb.png's visit also fails on zz_corrupt.jpg (the next
    # index) before a good file, so an epoch counts 2 + 1, whichever ranks' shards hold them.
    assert summary["substitutions"] == 3 * epochs, summary


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale ramp reaches the model as the same ramp in 8 bits (x >> 8), through every reader."""
    import numpy as np
    from PIL import Image

    from fastmae.data.augment import pil_apply
    from fastmae.data.image_io import open_image

    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit (or 32-bit) integers
        im.load()
        out = pil_apply(im, 64, False, (64, 64, 0, 0))
    expected = (ramp.astype(np.int64) >> 8).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert (out == 255).mean() < 0.01
    assert np.array_equal(np.asarray(open_image(path, "L")), expected)


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_sparse_multi_gb_file_that_passes_the_scan_is_not_read(tmp_path, demo_dir):
    from fastmae.data.sources import MAX_SAMPLE_BYTES, open_source

    data = tmp_path / "data"
    data.mkdir()
    jpgs = sorted(demo_dir.rglob("*.jpg"))[:4]
    for i, p in enumerate(jpgs):
        shutil.copy(p, data / f"img{i}.jpg")
    big = data / "zz_sparse.jpg"
    with big.open("wb") as f:  # a real JPEG, then a 3 GB hole, then an end-of-image marker: the scan passes it
        f.write(jpgs[0].read_bytes())
        f.seek(3 << 30)
        f.write(b"\xff\xd9")
    src = open_source(str(data), cache=False) if "cache" in open_source.__code__.co_varnames else open_source(str(data))
    i = next((k for k, n in enumerate(src.names) if "zz_sparse" in n), None)
    if i is None:
        pytest.skip("the scan already refuses this file")
    before = _rss_mb()
    with pytest.raises(ValueError, match=f"more than {MAX_SAMPLE_BYTES >> 20} MiB"):
        src.read_bytes(i)
    assert _rss_mb() - before < 100


def test_huge_cls_member_in_a_tar_shard_is_refused_unread(tmp_path, demo_dir):
    import io
    import tarfile

    from fastmae.data.sources import open_source

    shard = tmp_path / "shard-000000.tar"
    jpg = sorted(demo_dir.rglob("*.jpg"))[0].read_bytes()
    with shard.open("wb") as f:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(jpg)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT) + jpg + b"\0" * (-len(jpg) % 512))
        cls = tarfile.TarInfo("b.cls")
        cls.size = 2 << 30  # 2 GB of label, a hole on disk
        f.write(cls.tobuf(format=tarfile.USTAR_FORMAT))
        f.seek(cls.size, io.SEEK_CUR)
        f.write(b"\0" * 1024)
    before = _rss_mb()
    src = open_source(str(shard))
    assert _rss_mb() - before < 200
    assert [n for n, _ in src.bad] and ".cls member of" in src.bad[0][1], src.bad


def test_a_class_only_in_val_is_warned_about(tmp_path, demo_dir, capsys):
    import torch

    from fastmae.eval.data import stream_loaders

    jpgs = sorted(demo_dir.rglob("*.jpg"))
    root = tmp_path / "imnet"
    for split, classes in (("train", "ab"), ("val", "abc")):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                shutil.copy(jpgs[(ord(c) * 7 + k) % len(jpgs)], root / split / c / f"{k}.jpg")
    kw = dict(img_size=16, batch_size=2, eval_batch_size=2, augment="eval", loader="torch", num_workers=0, seed=0,
              rank=0, world_size=1, device=torch.device("cpu"))
    train, val = stream_loaders(str(root), str(root), **kw)
    err = capsys.readouterr().err
    assert "warning: class(es) c have validation images but no training images" in err, err
    shutil.rmtree(root / "val" / "c")
    stream_loaders(str(root), str(root), **kw)
    assert "no training images" not in capsys.readouterr().err


def test_an_undecodable_validation_image_is_excluded_from_the_count_and_named(tmp_path, demo_dir):
    """A validation file that passes the scan but fails to decode is not scored (label ignored) and is named."""
    from fastmae.data import build_loader

    data = tmp_path / "val" / "c0"
    data.parent.mkdir()
    corrupt, bomb = _planted_folder(demo_dir, data)
    ld = build_loader(tmp_path, split="val", batch_size=8, img_size=32, train=False, augment="eval",
                      drop_last=False, loader="torch", num_workers=0)
    ld.set_epoch(0)
    scored = sum(int((labels >= 0).sum()) for _, labels in ld)
    assert scored == 22  # 24 files, two of which cannot be decoded
    assert sorted(Path(p).name for p, _ in ld.bad_files) == sorted([corrupt, bomb])
