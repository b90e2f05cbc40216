"""Untrusted input to the data scan: cache files (no unpickling), huge files (bounded reads), hostile names."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from test_data_helpers import write_folder

from fastmae.data import printable
from fastmae.data.check import main as check_main
from fastmae.data.sources import open_source


class _Planted:
    """A pickle payload: loading it creates the sentinel file (what an attacker's payload would run)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def _old_index_name(root: Path, min_size: int = 8) -> str:
    # the name the pickle-based index (format version 1) used
    return "scan-" + hashlib.sha1(f"{root.resolve()}|{min_size}|1".encode()).hexdigest()[:20] + ".pkl"


def test_planted_pickles_never_execute(tmp_path, caplog):
    root = write_folder(tmp_path / "d", per_class=2)
    cache = tmp_path / "cache"
    open_source(root, index_cache=cache, warn=False)
    (new,) = list(cache.iterdir())
    assert new.suffix == ".json" and json.loads(new.read_text())["count"] == 6
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(sentinel))
    pickle.loads(payload)  # the payload is live: unpickling it does create the sentinel
    assert sentinel.exists()
    sentinel.unlink()
    new.write_bytes(payload)
    (cache / _old_index_name(root)).write_bytes(payload)
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        src = open_source(root, index_cache=cache, warn=False)
    assert not sentinel.exists()
    assert len(src) == 6 and "ignoring the scan index" in caplog.text
    assert json.loads(new.read_text())["count"] == 6  # rebuilt as JSON


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(root="/somewhere/else"),
        lambda d: d.update(count=d["count"] + 1),
        lambda d: d.update(min_size=1),
        lambda d: next(iter(d["entries"].values())).__setitem__(3, ["x", 2]),
        lambda d: d.update(version=1),
    ],
    ids=["root", "count", "min_size", "entry", "version"],
)
def test_mismatching_index_is_ignored_and_rebuilt(tmp_path, caplog, tamper, monkeypatch):
    import fastmae.data.sources as sources

    root = write_folder(tmp_path / "d", per_class=2)
    cache = tmp_path / "cache"
    first = open_source(root, index_cache=cache, warn=False)
    (path,) = list(cache.iterdir())
    data = json.loads(path.read_text())
    tamper(data)
    path.write_text(json.dumps(data))
    calls = []
    real = sources._check_file
    monkeypatch.setattr(sources, "_check_file", lambda f, m: calls.append(f) or real(f, m))
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        again = open_source(root, index_cache=cache, warn=False)
    assert "ignoring the scan index" in caplog.text and len(calls) == 6
    assert again.locs == first.locs and again.sizes == first.sizes
    assert json.loads(path.read_text())["root"] == str(root.resolve())


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from fastmae.data.sources import open_source
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    src = open_source(sys.argv[1], warn=False, threads=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad = sorted(p.rsplit("/", 1)[1] + "=" + r.split(" ")[0] for p, r in src.bad)
    print((peak - base) // 1024, len(src), ",".join(bad))
    """
)


def test_scan_of_huge_sparse_files_reads_a_bounded_head_and_tail(tmp_path):
    d = tmp_path / "huge" / "c"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(d / "ok.jpg")
    big = 2 << 30
    with open(d / "zeros.jpg", "wb") as f:
        f.truncate(big)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    with open(d / "cut.jpg", "wb") as f:
        f.write(buf.getvalue()[:-2])  # a real JPEG header, then 2 GB of holes: no end marker anywhere
        f.truncate(big)
    if os.stat(d / "zeros.jpg").st_blocks * 512 >= big:
        pytest.skip("this file system does not keep sparse files sparse")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "huge")], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    grown_mb, n_ok, bad = int(out[0]), int(out[1]), out[2]
    assert n_ok == 1 and bad == "cut.jpg=truncated,zeros.jpg=not"
    assert grown_mb < 100, f"the scan of two 2 GB files grew the process by {grown_mb} MB"


def test_printable_escapes_control_characters():
    assert printable("plain/path é 名.jpg") == "plain/path é 名.jpg"
    assert printable("a\x1b[2J\x1b]0;owned\x07b.jpg") == "a\\x1b[2J\\x1b]0;owned\\x07b.jpg"
    assert printable("x\ry\nz\tw\x7f\x9b") == "x\\x0dy\\x0az\\x09w\\x7f\\x9b"
    assert printable("evil\u202egpj.exe") == "evil\\u202egpj.exe"
    assert printable(os.fsdecode(b"bad\xffname")) == "bad\\xffname"
    assert printable(Path("/d/\x1bx")) == "/d/\\x1bx"


def test_reports_and_warnings_escape_file_names(tmp_path, capsys, caplog):
    root = write_folder(tmp_path / "d", per_class=2)
    hostile = "\x1b[31mred\x1b[0m\rforged.jpg"
    (root / "class0" / hostile).write_bytes(b"<html>not an image</html>")
    assert check_main([str(root), "--img-size", "16"]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert "\\x1b[31mred\\x1b[0m\\x0dforged.jpg" in out
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        src = open_source(root)
    assert src.bad[0][0].endswith(hostile)  # the data keeps the real name; only what is shown is escaped
    assert "\x1b" not in caplog.text and "\\x1b[31mred" in caplog.text
