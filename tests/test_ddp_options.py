"""DDP and FSDP2 options (issue 20 C8): bucket views, no buffer broadcast, bf16 gradient compression, HSDP mesh."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae.engine.distributed import hsdp_mesh_shape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ddp_options_worker import model_and_batch  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp_options")
    port, procs = _port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_options_worker.py"), str(tmp / "r")],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return [torch.load(tmp / f"r{r}.pt", weights_only=True) for r in range(2)]


def _local_grads(rank: int) -> dict[str, torch.Tensor]:
    """Each rank's own gradients, plain autograd (the independent reference)."""
    model, x = model_and_batch(rank)
    model(x).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_ddp_buckets_hold_the_gradients_and_buffers_are_not_rebroadcast(two_ranks):
    for r in two_ranks:
        assert r["none_flags"].tolist() == [True, False] and r["bf16_flags"].tolist() == [True, False]


def test_bf16_gradient_compression_numerics(two_ranks):
    g0, g1 = _local_grads(0), _local_grads(1)
    for name in g0:
        mean = (g0[name] + g1[name]) / 2
        # bf16_compress_hook: each rank rounds its gradient to bf16 and divides by the world size, the sum runs in
        # bf16, the result is widened back to fp32.
        emulated = (g0[name].bfloat16() / 2 + g1[name].bfloat16() / 2).float()
        for r in two_ranks:
            torch.testing.assert_close(r["none"][name], mean, rtol=1.3e-6, atol=1e-7)  # fp32 all-reduce
            torch.testing.assert_close(r["bf16"][name], emulated, rtol=0, atol=0)
            # Within bf16's rounding of each term and of the sum (2^-9 relative each), even where the terms cancel.
            assert ((r["bf16"][name] - mean).abs() <= 2**-8 * (g0[name].abs() + g1[name].abs())).all()
        assert torch.equal(two_ranks[0]["bf16"][name], two_ranks[1]["bf16"][name])
    assert any(not torch.equal(two_ranks[0]["bf16"][k], two_ranks[0]["none"][k]) for k in g0)  # it did compress


def test_hsdp_mesh_is_nodes_by_gpus_per_node(monkeypatch):
    assert hsdp_mesh_shape(256, 8) == (32, 8)
    assert hsdp_mesh_shape(8, 8) == (1, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hsdp_mesh_shape(32, 0) == (8, 4)
    with pytest.raises(ValueError, match="multiple of the GPUs per node"):
        hsdp_mesh_shape(12, 8)


def test_each_rank_gets_its_share_of_compile_threads_and_gloo_follows_nccl():
    from fastmae.engine.distributed import configure_rank_env

    env = {"LOCAL_WORLD_SIZE": "8", "NCCL_SOCKET_IFNAME": "ib0"}
    assert configure_rank_env(env, cores=64) == {"TORCHINDUCTOR_COMPILE_THREADS": "8", "GLOO_SOCKET_IFNAME": "ib0"}
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "8" and env["GLOO_SOCKET_IFNAME"] == "ib0"
    mine = {"LOCAL_WORLD_SIZE": "8", "TORCHINDUCTOR_COMPILE_THREADS": "2", "GLOO_SOCKET_IFNAME": "eth1",
            "NCCL_SOCKET_IFNAME": "ib0"}
    assert configure_rank_env(mine, cores=64) == {} and mine["TORCHINDUCTOR_COMPILE_THREADS"] == "2"
    assert configure_rank_env({"LOCAL_WORLD_SIZE": "8"}, cores=4) == {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


def test_cuda_12_and_13_dali_extras_are_both_offered():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["dali"] == ["nvidia-dali-cuda130"] and extras["dali-cu12"] == ["nvidia-dali-cuda120"]
