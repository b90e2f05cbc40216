"""``fastmae.ops``: the backend switch, the ``torch.library`` registrations (opcheck) and
``torch.compile(fullgraph=True)`` through the ops on CPU, with either backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETER, images, masking

from fastmae import ops
from fastmae import reference as R


@pytest.fixture
def backend(monkeypatch):
    """Set FASTMAE_KERNELS for one test; the cached switch is reset before and after."""

    def use(value: str | None):
        if value is None:
            monkeypatch.delenv(ops.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ops.ENV_VAR, value)
        ops.set_kernel_backend(None)
        torch._dynamo.reset()

    yield use
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    ops.set_kernel_backend(None)
    torch._dynamo.reset()


def test_default_backend_by_device(backend):
    backend(None)
    assert ops.kernel_backend("cpu") == "torch"
    assert ops.kernel_backend(torch.device("cuda")) == "triton"


@pytest.mark.parametrize("value,expected", [("triton", "triton"), ("torch", "torch"), ("TORCH ", "torch"), ("auto", None)])
def test_env_forces_backend(backend, value, expected):
    backend(value)
    assert ops.kernel_backend("cpu") == (expected or "torch")
    assert ops.kernel_backend("cuda") == (expected or "triton")


def test_switch_is_read_once(backend, monkeypatch):
    backend("torch")
    assert ops.kernel_backend("cuda") == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.kernel_backend("cuda") == "torch"


def test_bad_switch_value(backend):
    backend("cuda")
    with pytest.raises(ValueError, match="FASTMAE_KERNELS"):
        ops.kernel_backend("cpu")


def test_triton_op_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        torch.ops.fastmae.unshuffle_scatter(x, torch.zeros(4), torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 4, 4))


def _small_problem(kind="fp32"):
    N, C, S, p, D = 2, 3, 32, 8, 24
    L = (S // p) ** 2
    imgs, mean, std = images(N, C, S, S, kind)
    ids_keep, ids_restore, ids_masked = masking(N, L, 0.75)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(p * p * C, D, generator=g) * 0.1).to(DEVICE)
    mt = torch.randn(D, generator=g).to(DEVICE)
    pos = torch.randn(1, L + 1, D, generator=g).to(DEVICE)
    return dict(imgs=imgs, mean=mean, std=std, p=p, ids_keep=ids_keep, ids_restore=ids_restore,
                ids_masked=ids_masked, W=W, mt=mt, pos=pos)


def _tiny_mae(W, mt, imgs, pb, ops_module):
    """patch embed -> K2 -> prediction -> K3, all three ops, with every differentiable input in play."""
    x = ops_module.patchify_gather(imgs, pb["ids_keep"], pb["p"], pb["mean"], pb["std"]) @ W
    x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
    y = ops_module.unshuffle_scatter(x, mt, pb["ids_restore"], pb["pos"])
    pred = y[:, 1:] @ W.t()
    return ops_module.masked_recon_loss(pred, imgs.detach(), pb["ids_masked"], pb["p"], True, "mse", pb["mean"], pb["std"])


@pytest.mark.parametrize(
    "forced,kind",
    [
        ("triton", "fp32"),
        ("triton", "uint8"),
        ("torch", "fp32"),
        # Inductor's C++ build of the whole reference graph takes ~20 s on 2 cores: one reference case in CI.
        pytest.param("torch", "uint8", marks=pytest.mark.slow),
    ],
)
def test_compile_fullgraph_matches_eager(backend, forced, kind):
    if forced == "triton" and DEVICE.type == "cpu" and not INTERPRETER:
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    backend(forced)
    pb = _small_problem(kind)
    imgs = pb["imgs"].requires_grad_(True) if kind == "fp32" else pb["imgs"]

    def loss_and_grads(fn):
        W = pb["W"].clone().requires_grad_(True)
        mt = pb["mt"].clone().requires_grad_(True)
        loss = fn(W, mt, imgs, pb, ops)
        wrt = [W, mt] + ([imgs] if kind == "fp32" else [])
        return loss.detach(), torch.autograd.grad(loss, wrt)

    eager_loss, eager_grads = loss_and_grads(_tiny_mae)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(_tiny_mae, fullgraph=True))
    ref_loss, ref_grads = loss_and_grads(lambda W, mt, im, pb_, _: _tiny_mae(W, mt, im, pb_, R))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(eager_loss, ref_loss, rtol=2e-6, atol=0)
    for c, e, r in zip(compiled_grads, eager_grads, ref_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e, r, rtol=1e-5, atol=1e-6)


def test_dispatch_routes_by_backend(backend, monkeypatch):
    """The torch backend runs the reference; the triton backend runs the registered custom op."""
    pb = _small_problem()
    calls = []
    monkeypatch.setattr(R, "patchify_gather", lambda *a, **k: calls.append("ref") or torch.zeros(0))
    backend("torch")
    ops.patchify_gather(pb["imgs"], pb["ids_keep"], pb["p"])
    assert calls == ["ref"]
    if DEVICE.type == "cpu" and not INTERPRETER:
        return
    backend("triton")
    out = ops.patchify_gather(pb["imgs"], pb["ids_keep"], pb["p"])
    assert calls == ["ref"] and out.shape == (2, 4, 192)


@pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETER, reason="needs the Triton interpreter on CPU")
def test_opcheck_all_ops():
    pb = _small_problem()
    u8, mean, std = images(2, 3, 32, 32, "uint8")
    imgs = pb["imgs"].clone().requires_grad_(True)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    mt = pb["mt"].clone().requires_grad_(True)
    pos_trainable = pb["pos"].clone().requires_grad_(True)
    pred = torch.randn(2, 16, 192, device=DEVICE, requires_grad=True)
    pred_masked = torch.randn(2, 12, 192, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids_k, ids_r, ids_m, p = pb["ids_keep"], pb["ids_restore"], pb["ids_masked"], pb["p"]
    f = torch.ops.fastmae
    cases = [
        (f.patchify_gather, (imgs, ids_k, p, None, None, torch.float32)),
        (f.patchify_gather, (u8, ids_k, p, mean, std, torch.bfloat16)),
        (f.patchify_gather_backward, (torch.randn(2, 4, 192, device=DEVICE), ids_k, p, [2, 3, 32, 32], torch.float16)),
        (f.unshuffle_scatter, (x, mt, ids_r, pb["pos"])),
        (f.unshuffle_scatter, (x.detach().bfloat16().requires_grad_(True), mt, ids_r, pos_trainable)),
        (f.unshuffle_scatter_backward, (torch.randn(2, 17, 24, device=DEVICE), ids_r, 4, torch.float32, torch.float32)),
        (f.masked_recon_loss, (pred, pb["imgs"], ids_m, p, True, "mse", None, None, 1e-6)),
        (f.masked_recon_loss, (pred_masked, u8, ids_m, p, False, "l1", mean, std, 1e-6)),
        (f.masked_recon_loss, (pred.detach(), u8, ids_m, p, True, "mse", mean, std, 1e-6)),
        (f.masked_recon_loss_backward, (torch.tensor(3.7, device=DEVICE), pred.detach(), u8, ids_m, p, True, "mse",
                                        mean, std, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- ops found by convention (issue 23) -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _missing_parts(names) -> list[str]:
    """What each op's conventions require and the tree lacks: its kernel launchers, its eager twin, its public entry
    point, its tests and its benchmark module (the tests and reports find ops through ``ops.OPS`` and these names)."""
    missing = []
    for name in names:
        kernel = ROOT / "kernels" / f"{name}.py"
        source = kernel.read_text() if kernel.is_file() else ""
        missing += [f"kernels/{name}.py: def {name}_{kind}(" for kind in ("fwd", "bwd") if f"def {name}_{kind}(" not in source]
        missing += [f"fastmae.reference.{name}"] if not callable(getattr(R, name, None)) else []
        missing += [f"fastmae.ops.{name}"] if not callable(getattr(ops, name, None)) else []
        missing += [str(p.relative_to(ROOT)) for p in (ROOT / "tests" / f"test_{name}.py", ROOT / "bench" / f"bench_{name}.py")
                    if not p.is_file()]
    return missing


def test_every_op_has_its_kernel_twin_tests_and_bench():
    kernel_modules = {p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_")}
    assert kernel_modules == set(ops.OPS), "every kernels/<name>.py is registered in fastmae/ops.py, and only those"
    assert _missing_parts(ops.OPS) == []
    for name, op in ops.OPS.items():
        assert (op.forward._qualname, op.backward._qualname) == (f"fastmae::{name}", f"fastmae::{name}_backward")
        assert op.reference is getattr(R, name) and op.kernel_module == f"fastmae.kernels.{name}"


def test_an_op_without_its_parts_is_reported():
    assert _missing_parts(["frobnicate"]) == [
        "kernels/frobnicate.py: def frobnicate_fwd(", "kernels/frobnicate.py: def frobnicate_bwd(",
        "fastmae.reference.frobnicate", "fastmae.ops.frobnicate", "tests/test_frobnicate.py", "bench/bench_frobnicate.py",
    ]


def test_register_op_refuses_a_second_registration():
    with pytest.raises(ValueError, match="registered twice"):
        ops.register_op("gather_queries", "(Tensor x) -> Tensor", None, "(Tensor g) -> Tensor", None, save=tuple)
