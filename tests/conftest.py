"""Shared fixtures. Tests make their own data: nothing is downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton decides between its JIT and its interpreter when a kernel is decorated, i.e. when a kernel
# module is first imported, by whichever test module gets there first. Without a GPU the parity tests
# need the interpreter, so it is switched on here, before any test module is imported. The GPU compile
# checks run in subprocesses that drop the variable (tests/test_gpu_compile.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def use_backend():
    """Switch fastmae.ops between 'torch' and 'triton' inside a test; restores the default after."""
    from fastmae import ops

    yield ops.set_kernel_backend
    ops.set_kernel_backend(None)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded demo set (crops of photos shipped in installed packages), built once per test run.

    The cache sits above the per-worker temp dirs so pytest-xdist workers share it;
    prepare_demo_dataset is safe to call concurrently.
    """
    from fastmae.data import prepare_demo_dataset

    cache = tmp_path_factory.getbasetemp().parent / "fastmae-demo-cache"
    return Path(prepare_demo_dataset(cache))


@pytest.fixture
def fresh_env(tmp_path) -> dict:
    """Environment for subprocess runs: one thread each (2 cores are shared), cache in tmp."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, demo_dir) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (made once per module, copied per test)."""
    from run_helpers import TINY

    from fastmae.pretrain import cli_main

    out = tmp_path_factory.mktemp("four") / "run"
    assert cli_main([f"--data={demo_dir}", f"--output_dir={out}", *TINY, "--max_steps=4"]) == 0
    return out


@pytest.fixture
def run_dir(four_steps, tmp_path) -> Path:
    """A private copy of the 4-step run, free to damage."""
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    return out
