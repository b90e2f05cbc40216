"""`fastmae data pack`: trees and tar shards round-trip into packs the loaders read without a scan;
a killed pack resumes; corrupt inputs are reported, not packed; a different pack is never overwritten."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmae.data import build_loader
from fastmae.data import sources as sources_mod
from fastmae.data.demo import sample_photos
from fastmae.data.pack import PackConfig, open_pack, pack

ROOT = Path(__file__).parent.parent


def _jpeg(arr, size, mode="RGB", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).resize(size, Image.BICUBIC).save(buf, fmt, quality=90)
    return buf.getvalue()


def _corrupt(data: bytes) -> bytes:
    """Valid header and end marker, garbage entropy data: passes the loaders' scan, fails the decode."""
    mid = len(data) // 2
    return data[:mid] + b"\xff\x00" * 40 + b"\xff\xd0\x12\xff\xc9" * 50 + data[mid + 300 :]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    photos = list(sample_photos().values())
    sizes = [(500, 375), (300, 400), (200, 150), (640, 480), (260, 300), (90, 120)]
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            cls = f"c{i % 2}"
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            mode, fmt = ("L", "JPEG") if i == 3 else ("RGB", "PNG") if i == 5 else ("RGB", "JPEG")
            (d / f"{i:03d}.{fmt.lower()[:3].replace('jpe', 'jpg')}").write_bytes(
                _jpeg(photos[i % len(photos)], sizes[i % len(sizes)], mode, fmt))
    good = (root / "train" / "c0" / "000.jpg").read_bytes()
    (root / "train" / "c1" / "bad-entropy.jpg").write_bytes(_corrupt(good))
    (root / "train" / "c1" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_tree_round_trips_and_loaders_read_it_without_a_scan(tree, tmp_path, monkeypatch):
    dst = tmp_path / "pack"
    index = pack(PackConfig(src=str(tree), dst=str(dst), shard_size=5, workers=2), log=lambda m: None)
    assert index["classes"] == ["c0", "c1"] and index["splits"]["train"]["count"] == 12
    assert index["splits"]["val"]["count"] == 4 and len(index["splits"]["train"]["shards"]) == 3
    assert {Path(n).name for n, _ in index["bad"]} == {"bad-entropy.jpg", "truncated.jpg"}
    src = open_pack(dst, "train")
    for i, name in enumerate(src.names):
        orig = Path(name.split(":", 1)[1])
        assert src.labels[i] == ["c0", "c1"].index(orig.parent.name)
        with Image.open(orig) as o, Image.open(io.BytesIO(src.read_bytes(i))) as p:
            assert p.format == "JPEG" and p.size == src.sizes[i]
            assert min(p.size) == min(256, min(o.size))
            if min(o.size) <= 256 and o.format == "JPEG":
                assert src.read_bytes(i) == orig.read_bytes()  # within the bound: copied, no second lossy generation
            ref = np.asarray(o.convert("RGB").resize(p.size, Image.BICUBIC), dtype=np.float64)
            got = np.asarray(p.convert("RGB"), dtype=np.float64)
            assert 10 * np.log10(255**2 / max(((ref - got) ** 2).mean(), 1e-9)) > 30
    # the members are plain webdataset samples
    with tarfile.open(dst / "train-000000.tar") as tf:
        names = tf.getnames()
    assert names[:2] == ["train000000000.jpg", "train000000000.cls"]

    def no_scan(*a, **k):
        raise AssertionError("a pack must not be scanned")

    monkeypatch.setattr(sources_mod, "_check_region", no_scan)
    monkeypatch.setattr(sources_mod, "_check_file", no_scan)
    decodes = ("fast", "dali_roi") if importlib.util.find_spec("nvidia.dali") else ("fast",)
    for decode in decodes:
        ld = build_loader(dst, batch_size=4, img_size=32, output="uint8", num_workers=0, decode=decode)
        x, y = next(iter(ld))
        assert x.shape == (4, 32, 32, 3) and set(y.tolist()) <= {0, 1}
    val = build_loader(dst, split="val", batch_size=2, img_size=32, output="uint8", num_workers=0, train=False)
    assert val.num_samples == 4


def test_tar_shards_round_trip(tree, tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    files = sorted((tree / "train").rglob("0*.*"))
    for s in range(2):
        with tarfile.open(shard_dir / f"s-{s}.tar", "w") as tf:
            for k, f in enumerate(files[s::2]):
                for ext, payload in ((f.suffix[1:], f.read_bytes()), ("cls", str(7 + s).encode())):
                    info = tarfile.TarInfo(f"k{s}{k:03d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    dst = tmp_path / "pack"
    index = pack(PackConfig(src=str(shard_dir / "s-{0..1}.tar"), dst=str(dst), shard_size=4, workers=1), log=lambda m: None)
    assert index["splits"]["train"]["count"] == len(files) and index["bad"] == []
    src = open_pack(dst, "train")
    assert sorted(src.labels) == sorted([7] * len(files[0::2]) + [8] * len(files[1::2]))


def test_killed_pack_resumes_to_the_same_pack(tree, tmp_path, fresh_env):
    ref = pack(PackConfig(src=str(tree), dst=str(tmp_path / "ref"), shard_size=1, workers=1), log=lambda m: None)
    dst = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastmae.cli", "data", "pack", str(tree), str(dst), "--shard_size=1", "--workers=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fresh_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(dst.glob("train-*.json")) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dst / "pack.json").exists(), "the pack finished before the kill: the test proves nothing"
    (dst / ".train-000099.tar.12345.tmp").write_bytes(b"half a shard")  # what a kill mid-shard leaves
    r = subprocess.run(cmd, cwd=ROOT, env=fresh_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stdout
    got = json.loads((dst / "pack.json").read_text())
    assert got["source_checksum"] == ref["source_checksum"] and got["splits"] == ref["splits"]
    assert not list(dst.glob(".*.tmp")) and not list(dst.glob("*.json"))[1:]


def test_corrupt_inputs_reported_not_packed_and_other_packs_refused(tree, tmp_path, fresh_env):
    dst = tmp_path / "pack"
    cmd = [sys.executable, "-m", "fastmae.cli", "data", "pack", str(tree), str(dst), "--workers=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=fresh_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NOT PACKED" in r.stdout and "bad-entropy.jpg: decode failed" in r.stdout
    assert "truncated.jpg: truncated JPEG" in r.stdout
    names = open_pack(dst, "train").names
    assert not any("bad-entropy" in n or "truncated" in n for n in names)
    r = subprocess.run([*cmd, "--short_side=128"], cwd=ROOT, env=fresh_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds a different pack" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "notempty"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    r = subprocess.run([*cmd[:-2], str(other), "--workers=1"], cwd=ROOT, env=fresh_env, capture_output=True, text=True)
    assert r.returncode == 2 and "not empty and holds no pack" in r.stderr


def test_packs_honour_pinned_classes_and_require_labels(tree, tmp_path):
    """As for folders: pinned class names renumber the labels, a class outside them is an error, and
    require_labels refuses unlabeled samples (the pack path used to return before both checks)."""
    from fastmae.data.sources import open_source

    dst = tmp_path / "pack"
    pack(PackConfig(src=str(tree), dst=str(dst), shard_size=5, workers=1), log=lambda m: None)
    plain = open_source(dst, "train")
    pinned = open_source(dst, "train", classes=["c1", "zz", "c0"])
    assert pinned.classes == ["c1", "zz", "c0"] and pinned.names == plain.names
    assert pinned.labels == [{0: 2, 1: 0}[lb] for lb in plain.labels]
    with pytest.raises(ValueError, match=r"'c1'.* not among the 1 given classes"):
        open_source(dst, "train", classes=["c0"])
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "s-0.tar", "w") as tf:
        for k, f in enumerate(sorted((tree / "train").rglob("0*.jpg"))[:3]):
            info = tarfile.TarInfo(f"k{k:03d}.jpg")
            info.size = f.stat().st_size
            tf.addfile(info, io.BytesIO(f.read_bytes()))
    unlabeled = tmp_path / "unlabeled"
    pack(PackConfig(src=str(shard_dir / "s-0.tar"), dst=str(unlabeled), workers=1), log=lambda m: None)
    assert len(open_source(unlabeled, "train")) == 3
    with pytest.raises(ValueError, match="3 sample.* have no .cls label"):
        open_source(unlabeled, "train", require_labels=True)
