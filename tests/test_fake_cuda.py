"""The GPU path of the MAE forward, proven on a machine without a GPU.

A ``FakeTensorMode`` carries shapes, dtypes and devices but no data, so a model
built and run under it with ``device="cuda"`` takes every CUDA branch without
touching a GPU:

- the forward dispatches to the Triton custom ops (``torch.ops.fastmae.*``),
  counted by a ``TorchDispatchMode``;
- it contains no host sync: a ``.item()``, ``.tolist()``, ``bool(tensor)`` or
  ``nonzero`` needs data, which a fake tensor does not have, so it raises
  (``DataDependentOutputException`` / ``DynamicOutputShapeException``); the
  negative controls inject each into the forward and see it caught;
- ``torch.compile(fullgraph=True)`` traces it (Dynamo runs on fake tensors
  anyway) with the three custom ops in the one graph.

Where PyTorch stops without a GPU: the backward (the autograd engine and
AOTAutograd's joint trace both need a CUDA primary context: "hasPrimaryContext
expects a valid device index"), autocast on CUDA (``torch.autocast("cuda")``
disables itself when no GPU is present), and SDPA with one kernel preferred
(cuDNN/flash/efficient: the fake kernel selection queries the driver). Here the
attention chooser sees no GPU capabilities and picks plain SDPA; the pinned
kernels' trace is tested on CPU in tests/test_attention.py. The backward kernels are covered by
the Triton interpreter parity tests and the sm_80/sm_90 compile checks; the
autocast dtype by tests/test_attention.py under CPU autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae.models.mae import create_model

FASTMAE_OPS = {"fastmae.patchify_gather.default", "fastmae.unshuffle_scatter.default", "fastmae.masked_recon_loss.default"}


class OpLog(TorchDispatchMode):
    """Every op that reaches dispatch, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernels_auto(use_backend):
    use_backend("auto")  # CUDA tensors -> the Triton custom ops (their fake impls run here)


def _images(kind: str) -> torch.Tensor:
    if kind == "uint8":
        return torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)  # what DALI hands the model
    return torch.randn(4, 3, 64, 64)


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_forward_on_cuda_tensors_runs_the_fused_ops_and_never_syncs(kernels_auto, kind):
    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        model = create_model("mae_vit_tiny", norm_pix_loss=True)
        imgs = _images(kind)
        assert imgs.is_cuda and model.pos_embed.is_cuda
        with OpLog() as log:
            loss, pred, mask = model(imgs, mask_ratio=0.75)  # any host sync would raise here
    assert FASTMAE_OPS <= set(log.names)
    assert all(log.names.count(op) == 1 for op in FASTMAE_OPS)
    assert loss.is_cuda and loss.dtype == torch.float32 and loss.shape == ()
    assert tuple(pred.shape) == (4, 64, 192) and tuple(mask.shape) == (4, 64)
    assert not any("_local_scalar_dense" in n or "nonzero" in n for n in log.names)


def _sync_in_decoder(kind: str):
    def sync(x: torch.Tensor) -> None:
        if kind == "item":
            x.sum().item()
        elif kind == "tolist":
            x[0, 0, :2].tolist()
        elif kind == "bool":
            bool(x.sum() > 0)
        else:
            x.nonzero()

    return sync


@pytest.mark.parametrize("kind", ["item", "tolist", "bool", "nonzero"])
def test_negative_control_a_host_sync_in_the_forward_is_caught(kernels_auto, monkeypatch, kind):
    sync = _sync_in_decoder(kind)
    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        model = create_model("mae_vit_tiny", norm_pix_loss=True)
        real_decoder = model.forward_decoder

        def decoder_with_sync(x, ids_restore, grid=None):
            sync(x)
            return real_decoder(x, ids_restore, grid)

        monkeypatch.setattr(model, "forward_decoder", decoder_with_sync)
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            model(_images("uint8"))


def test_compile_fullgraph_traces_the_cuda_forward_with_the_custom_ops(kernels_auto):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        model = create_model("mae_vit_tiny", norm_pix_loss=True)
        compiled = torch.compile(model, backend=capture, fullgraph=True)  # a graph break would raise
        loss, _, _ = compiled(_images("uint8"))
    assert loss.is_cuda
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert FASTMAE_OPS <= targets
    torch._dynamo.reset()
