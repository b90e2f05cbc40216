"""K3 (masked reconstruction loss) against the eager reference, through ``fastmae.ops.masked_recon_loss``
with the Triton backend forced (the custom op and its registered autograd; the interpreter on CPU).

Both accumulate in fp32, in different orders, so the loss and the gradient are compared with
tolerances: fp32 ~1e-6 relative. With bf16/fp16 predictions the loss is still an fp32
computation (the reference upcasts too), so the same tolerance holds; the gradient is rounded
to the prediction dtype once, and is compared with the fp32 oracle (the reference on the
upcast predictions): its error must be at most twice the eager reference's error in the same
dtype, and within one ulp of the oracle rounded the kernel's way (under the interpreter bf16
truncates: ``kernel_helpers.kernel_downcast``).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETER, images, kernel_downcast, masking, ulp

from fastmae import ops
from fastmae import reference as R

masked_recon_loss = ops.masked_recon_loss


@pytest.fixture(autouse=True)
def _triton_backend(use_backend):
    use_backend("triton")

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RTOL32 = 2e-6

# (N, C, H, W, patch, mask ratio)
SHAPES = [
    pytest.param(2, 3, 224, 224, 16, 0.75, id="vitb-224p16"),
    pytest.param(1, 3, 56, 56, 14, 0.75, id="p14-P588"),
    pytest.param(3, 1, 32, 24, 4, 0.5, id="C1-p4"),
    pytest.param(1, 3, 64, 64, 8, 0.9, id="batch1-p8-r0.9"),
]


def _run(pred, imgs, ids_masked, p, norm_pix, loss_type, mean, std, impl, upstream=1.0):
    leaf = pred.detach().clone().requires_grad_(True)
    loss = impl(leaf, imgs, ids_masked, p, norm_pix, loss_type, mean, std)
    (grad,) = torch.autograd.grad(loss * upstream, leaf)
    return loss.detach(), grad


def _case(N, C, H, W, p, ratio, kind, full, pred_dtype=torch.float32, seed=0):
    imgs, mean, std = images(N, C, H, W, kind, seed=seed)
    L = (H // p) * (W // p)
    _, _, ids_masked = masking(N, L, ratio, seed=seed)
    rows = L if full else ids_masked.shape[1]
    pred = torch.randn(N, rows, p * p * C, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, pred_dtype)
    return pred, imgs, ids_masked, mean, std


def _assert_close32(got, want, what):
    scale = want.abs().max().clamp_min(1e-30)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= RTOL32, f"{what}: max relative error {err:.3g} > {RTOL32}"


@pytest.mark.parametrize("N,C,H,W,p,ratio", SHAPES)
@pytest.mark.parametrize("kind,full,norm_pix,loss_type", [
    ("fp32", True, True, "mse"),
    ("uint8", False, True, "l1"),
    ("uint8", True, False, "mse"),
])
def test_fp32_loss_and_grad(N, C, H, W, p, ratio, kind, full, norm_pix, loss_type):
    pred, imgs, ids, mean, std = _case(N, C, H, W, p, ratio, kind, full)
    loss, grad = _run(pred, imgs, ids, p, norm_pix, loss_type, mean, std, masked_recon_loss)
    loss_r, grad_r = _run(pred, imgs, ids, p, norm_pix, loss_type, mean, std, R.masked_recon_loss)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_close32(loss, loss_r, "loss")
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    _assert_close32(grad, grad_r, "grad")
    if full:
        # Rows of visible patches get exactly zero gradient.
        visible = torch.ones(N, pred.shape[1], dtype=torch.bool, device=DEVICE)
        visible.scatter_(1, ids, False)
        assert torch.all(grad[visible] == 0)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("norm_pix,loss_type,full", [(True, "mse", False), (False, "l1", True)])
def test_float_image_dtypes(kind, norm_pix, loss_type, full):
    pred, imgs, ids, mean, std = _case(2, 3, 32, 32, 8, 0.75, kind, full, seed=3)
    loss, grad = _run(pred, imgs, ids, 8, norm_pix, loss_type, mean, std, masked_recon_loss)
    loss_r, grad_r = _run(pred, imgs, ids, 8, norm_pix, loss_type, mean, std, R.masked_recon_loss)
    _assert_close32(loss, loss_r, "loss")
    _assert_close32(grad, grad_r, "grad")


@pytest.mark.parametrize("pred_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind,loss_type", [("uint8", "mse"), ("fp32", "l1")])
def test_low_precision_pred_against_fp32_oracle(pred_dtype, kind, loss_type):
    dt = DT[pred_dtype]
    pred, imgs, ids, mean, std = _case(2, 3, 64, 64, 16, 0.75, kind, True, dt, seed=5)
    loss, grad = _run(pred, imgs, ids, 16, True, loss_type, mean, std, masked_recon_loss)
    loss_e, grad_e = _run(pred, imgs, ids, 16, True, loss_type, mean, std, R.masked_recon_loss)
    loss_o, grad_o = _run(pred.float(), imgs, ids, 16, True, loss_type, mean, std, R.masked_recon_loss)
    assert grad.dtype == dt
    _assert_close32(loss, loss_o, "loss")
    # Within one ulp of the oracle rounded the kernel's way, and mostly equal to it.
    expected = kernel_downcast(grad_o, dt).float()
    diff = (grad.float() - expected).abs()
    assert (diff <= ulp(grad_o, dt)).all()
    assert (diff == 0).float().mean() >= 0.99
    if not (INTERPRETER and dt == torch.bfloat16):
        # Same rounding as PyTorch: the error against the oracle is at most twice the eager one.
        err = (grad.float() - grad_o).abs().max()
        err_eager = (grad_e.float() - grad_o).abs().max()
        assert err <= 2 * err_eager + ulp(grad_o.abs().max(), torch.float32)


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("full,loss_type", [(True, "mse"), (False, "mse"), (True, "l1")])
def test_gradient_with_upstream_scale(dt, full, loss_type):
    """The backward reads the upstream gradient (here 3.7, then -0.25) on the device and folds it in."""
    pred, imgs, ids, mean, std = _case(2, 3, 32, 32, 8, 0.5, "uint8", full, DT[dt], seed=7)
    for upstream in (3.7, -0.25):
        _, grad = _run(pred, imgs, ids, 8, True, loss_type, mean, std, masked_recon_loss, upstream)
        _, grad_o = _run(pred.float(), imgs, ids, 8, True, loss_type, mean, std, R.masked_recon_loss, upstream)
        assert grad.dtype == DT[dt] and grad.shape == pred.shape
        if dt == "fp32":
            _assert_close32(grad, grad_o, "grad")
        else:
            # One rounding to pred's dtype, the kernel's way, of the fp32 oracle: within one ulp.
            assert ((grad.float() - kernel_downcast(grad_o, DT[dt]).float()).abs() <= ulp(grad_o, DT[dt])).all()


def test_gradient_inside_a_bigger_graph():
    """The loss feeds several consumers, so its upstream gradient is a computed tensor (3.7 + 2 * loss), and pred
    comes from a product whose factors need gradients: every leaf's gradient matches the reference's autograd."""
    N, p, ratio = 2, 8, 0.75
    imgs, mean, std = images(N, 3, 32, 32, "uint8", seed=8)
    _, _, ids = masking(N, 16, ratio, seed=8)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(N, 16, 24, generator=g).to(DEVICE)
    W = (torch.randn(24, p * p * 3, generator=g) * 0.2).to(DEVICE)

    def grads(impl):
        h_, W_ = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        pred = h_ @ W_
        loss = impl(pred, imgs, ids, p, True, "mse", mean, std)
        total = 3.7 * loss + loss * loss + 0.1 * pred.square().mean()
        return torch.autograd.grad(total, (h_, W_))

    for got, want, name in zip(grads(masked_recon_loss), grads(R.masked_recon_loss), ("h", "W"), strict=True):
        _assert_close32(got, want, name)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_crossmae_target_subset(dt):
    """CrossMAE predicts a random subset of the masked patches: ids_target (N, L_t) with pred (N, L_t, P), row j <->
    patch ids_target[n, j]. Loss and gradient match the reference on the same ids and an fp32 oracle."""
    N, p, L = 3, 8, 16
    imgs, mean, std = images(N, 3, 32, 32, "uint8", seed=12)
    _, _, ids_masked = masking(N, L, 0.75, seed=12)
    g = torch.Generator().manual_seed(13)
    pick = torch.argsort(torch.rand(N, ids_masked.shape[1], generator=g), dim=1)[:, :5].to(DEVICE)
    ids_target = torch.gather(ids_masked, 1, pick)  # 5 of the 12 masked patches, in random order
    pred = torch.randn(N, 5, p * p * 3, generator=g).to(DEVICE, DT[dt])
    loss, grad = _run(pred, imgs, ids_target, p, True, "mse", mean, std, masked_recon_loss, 2.5)
    loss_o, grad_o = _run(pred.float(), imgs, ids_target, p, True, "mse", mean, std, R.masked_recon_loss, 2.5)
    _assert_close32(loss, loss_o, "loss")
    if dt == "fp32":
        _assert_close32(grad, grad_o, "grad")
    else:
        assert ((grad.float() - kernel_downcast(grad_o, DT[dt]).float()).abs() <= ulp(grad_o, DT[dt])).all()
    # The same patches scored through a full (N, L, P) prediction give the same loss.
    full = torch.zeros(N, L, p * p * 3, device=DEVICE, dtype=pred.dtype)
    full.scatter_(1, ids_target.unsqueeze(-1).expand(-1, -1, p * p * 3), pred)
    _assert_close32(masked_recon_loss(full, imgs, ids_target, p, True, "mse", mean, std), loss_o, "loss (full pred)")


def test_matches_official_mask_weighted_formula():
    """An independent statement of the semantics: the official mask-weighted loss over all patches."""
    N, L, p = 2, 16, 8
    imgs, _, _ = images(N, 3, 32, 32, "fp32", seed=9)
    ids_keep, ids_restore, ids_masked = masking(N, L, 0.75, seed=9)
    mask = torch.ones(N, L, device=DEVICE)
    mask[:, : ids_keep.shape[1]] = 0
    mask = torch.gather(mask, 1, ids_restore)
    pred = torch.randn(N, L, p * p * 3, device=DEVICE)
    for norm_pix in (True, False):
        got = masked_recon_loss(pred, imgs, ids_masked, p, norm_pix)
        want = R.masked_recon_loss_official(pred, imgs, mask, p, norm_pix)
        _assert_close32(got, want, f"norm_pix={norm_pix}")


def test_no_grad_forward():
    pred, imgs, ids, mean, std = _case(1, 3, 32, 32, 8, 0.75, "uint8", True)
    with torch.no_grad():
        leaf = pred.clone().requires_grad_(True)
        loss = masked_recon_loss(leaf, imgs, ids, 8, True, "mse", mean, std)
    assert not loss.requires_grad
    _assert_close32(loss, R.masked_recon_loss(pred, imgs, ids, 8, True, "mse", mean, std), "loss")


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("loss_type", ValueError, "loss_type"),
        ("pred_rows", ValueError, "pred has"),
        ("pred_P", ValueError, "pred must be"),
        ("pred_int", TypeError, "pred must be fp32"),
        ("ids_float", TypeError, "ids_masked"),
        ("no_mean", ValueError, "mean and std"),
        ("empty", ValueError, "at least one masked"),
    ],
)
def test_bad_input_raises(case, exc, match):
    pred, imgs, ids, _, _ = _case(2, 3, 32, 32, 8, 0.75, "fp32", True)
    u8, _, _ = images(2, 3, 32, 32, "uint8")
    args = {
        "loss_type": (pred, imgs, ids, 8, True, "huber"),
        "pred_rows": (pred[:, :5], imgs, ids, 8),
        "pred_P": (pred[..., :10], imgs, ids, 8),
        "pred_int": (pred.to(torch.int32), imgs, ids, 8),
        "ids_float": (pred, imgs, ids.float(), 8),
        "no_mean": (pred, u8, ids, 8),
        "empty": (pred, imgs, ids[:, :0], 8),
    }[case]
    with pytest.raises(exc, match=match):
        masked_recon_loss(*args)
