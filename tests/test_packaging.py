"""The top-level kernels/ folder installs as fastmae.kernels (never as `kernels`), editable or not."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import fastmae

ROOT = Path(__file__).parent.parent


def test_editable_install_maps_kernels_into_fastmae():
    import fastmae.kernels._common

    assert Path(fastmae.kernels._common.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert Path(fastmae.__file__).resolve().parent == (ROOT / "fastmae").resolve()


def test_wheel_contains_fastmae_kernels_and_imports_from_it(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(tmp_path.glob("fastmae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastmae/kernels/patchify_gather.py" in names
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not claim the `kernels` import name"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import fastmae.kernels.patchify_gather as k, fastmae; print(k.__file__); print(fastmae.__version__)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith(str(site)), r.stdout
    assert r.stdout.splitlines()[1] == fastmae.__version__
