"""Runs ``family_kernels_check.py`` (SimMIM and VideoMAE through the Triton kernels == the reference path) in a
fresh interpreter with ``TRITON_INTERPRET=1`` set before triton is imported; on a GPU machine, with the real kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_family_models_through_triton_kernels_equal_reference():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "family_kernels_check.py")],
        capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900,
    )
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout
