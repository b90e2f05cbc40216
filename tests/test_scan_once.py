"""One scan per job (issue 20 B5): rank 0 scans or reuses the index kept beside the run and broadcasts the table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmae.data import build_loader

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp: Path, data: Path, index: Path, tag: str) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = tmp / f"{tag}-{rank}.json"
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "scan_worker.py"), str(data), str(index),
                                        str(out)], env=env, stderr=subprocess.PIPE, text=True), out))
    results = []
    for p, out in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.read_text()))
    return results


def test_two_ranks_scan_once_a_restart_scans_nothing_and_a_change_is_seen(tmp_path):
    data, index = _tree(tmp_path / "data"), tmp_path / "run" / "scan-index"
    first = _two_ranks(tmp_path, data, index, "first")
    assert [r["checked"] for r in first] == [6, 0]  # rank 0 read the files; rank 1 received the table
    assert first[0]["files"] == first[1]["files"] == 6 and first[0]["sizes"] == first[1]["sizes"]
    again = _two_ranks(tmp_path, data, index, "again")  # a requeued job: the index beside the run is reused
    assert [r["checked"] for r in again] == [0, 0] and again[1]["labels"] == first[1]["labels"]
    victim = data / "train" / "c1" / "2.jpg"
    victim.write_bytes(victim.read_bytes()[:-40])  # truncated in place: size and mtime change
    Image.new("RGB", (30, 30)).save(data / "train" / "c0" / "new.jpg")
    changed = _two_ranks(tmp_path, data, index, "changed")
    assert [r["checked"] for r in changed] == [2, 0]  # only the changed and the new file are read again
    for r in changed:
        assert r["files"] == 6 and r["bad"] == [str(victim)]


def test_an_error_on_rank_0_reaches_every_rank(tmp_path):
    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    (data / "train" / "c0" / "x.jpg").write_bytes(b"not a jpeg")
    results = _two_ranks(tmp_path, data, tmp_path / "index", "bad")
    assert all(r["error"].startswith("no usable images") for r in results)  # no rank waits forever


def test_a_flat_val_folder_gives_the_held_out_split(tmp_path):
    """ROOT/train/<class>/ beside a flat ROOT/val/*.jpg: the held-out loss reads val/ (labels -1: none needed)."""
    data = _tree(tmp_path / "data")
    (data / "val").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(data / "val" / f"v{i}.jpg")
    val = build_loader(data, split="val", batch_size=1, img_size=16, num_workers=0, train=False, drop_last=False)
    assert len(val.source) == 3 and val.source.labels == [-1, -1, -1]
    assert sum(imgs.shape[0] for imgs, _ in val) == 3
    with pytest.raises(ValueError, match="no class folder"):
        build_loader(data, split="val", batch_size=1, img_size=16, num_workers=0, train=False, require_labels=True)
