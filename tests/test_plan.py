"""GPU readiness on CPU: the layout/plan decisions, MFU peaks by exact device name, norm-only gradient clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmae.engine import flops
from fastmae.engine.optim import grad_norm_

# ---- MFU peaks: exact device names ---------------------------------------------------------------------------

# Strings as torch.cuda.get_device_name returns them on each part.
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA B200": 2250.0,
}


@pytest.mark.parametrize("name,tflops", DEVICE_NAMES.items())
def test_peak_flops_by_exact_device_name(monkeypatch, name, tflops):
    monkeypatch.delenv("FASTMAE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA GeForce RTX 4090", "H100", "Tesla V100-SXM2-16GB"])
def test_unknown_or_partial_names_have_no_peak(monkeypatch, name):
    # A MIG slice has a fraction of the peak: no MFU beats a wrong one.
    monkeypatch.delenv("FASTMAE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) is None


def test_peak_override_and_cpu(monkeypatch):
    monkeypatch.delenv("FASTMAE_PEAK_TFLOPS", raising=False)
    assert flops.peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("FASTMAE_PEAK_TFLOPS", "500")
    assert flops.peak_flops(torch.device("cpu")) == 500e12


# ---- grad_norm_: measure without writing when not clipping -------------------------------------------------------


def _net_with_grads() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    net(torch.randn(5, 8)).square().sum().backward()
    return net


def test_norm_only_writes_no_gradient_and_matches_torch():
    net = _net_with_grads()
    grads = [p.grad for p in net.parameters()]
    before = [g._version for g in grads]
    snapshot = [g.clone() for g in grads]
    norm = grad_norm_(net.parameters(), 0.0)
    assert [g._version for g in grads] == before
    for g, s in zip(grads, snapshot, strict=True):
        assert torch.equal(g, s)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in snapshot]))
    torch.testing.assert_close(norm, expected)
    assert isinstance(norm, torch.Tensor) and norm.device == grads[0].device
    # The control: torch's clip_grad_norm_ with an infinite bound still rescales (writes) every gradient.
    torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"), foreach=True)
    assert [g._version for g in grads] != before


def test_positive_max_norm_clips_like_torch():
    a, b = _net_with_grads(), _net_with_grads()
    n_ours = grad_norm_(a.parameters(), 0.1)
    n_torch = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1, foreach=True)
    torch.testing.assert_close(n_ours, n_torch)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(0.1), rtol=1e-4, atol=0)


def test_negative_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        grad_norm_(_net_with_grads().parameters(), -1.0)


# ---- residual dtype under autocast ----------------------------------------------------------------------------


def test_residual_stream_is_fp32_by_default_and_bf16_on_request():
    from fastmae.layers.block import Block

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    dtypes = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(1)
        blk = Block(32, 4, residual_dtype=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes[name] = blk(x).dtype
        assert blk(x).dtype == torch.float32  # without autocast nothing changes
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        Block(32, 4, residual_dtype="fp16")


def test_mae_residual_option_reaches_encoder_and_decoder_blocks():
    from fastmae.models.mae import create_model

    model = create_model("mae_vit_tiny", residual_dtype="bf16")
    blocks = list(model.blocks) + list(model.decoder_blocks)
    assert {b.residual_dtype for b in blocks} == {torch.bfloat16}
    assert {b.residual_dtype for b in create_model("mae_vit_tiny").decoder_blocks} == {None}
    imgs = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(imgs)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
