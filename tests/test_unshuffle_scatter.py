"""K2 (unshuffle scatter + mask token + positions) against the eager reference, through
``fastmae.ops.unshuffle_scatter`` with the Triton backend forced (the interpreter on CPU).

Forward, the visible tokens' gradient and the position table's gradient must be identical to
the reference (bf16 outputs under the interpreter: see ``kernel_helpers.kernel_downcast``).
The mask token's gradient is a sum over the batch and the masked positions; the kernel sums
in a fixed order (deterministic) but not PyTorch's order, so it is compared with an fp64
oracle of the same terms: within fp32 summation error for fp32, and within one ulp of the
x dtype (plus that slack) for bf16/fp16, where the final value is rounded to x's dtype as in
the reference.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, kernel_downcast, masking, ulp

from fastmae import ops
from fastmae import reference as R

unshuffle_scatter = ops.unshuffle_scatter


@pytest.fixture(autouse=True)
def _triton_backend(use_backend):
    use_backend("triton")

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (N, L, mask ratio, D): the MAE decoder widths with real and scaled-down token counts, and awkward ones.
SHAPES = [
    pytest.param(2, 196, 0.75, 512, id="vitb-dec512-L196"),
    pytest.param(1, 64, 0.75, 768, id="D768"),
    pytest.param(2, 16, 0.5, 1024, id="D1024-r0.5"),
    pytest.param(1, 20, 0.9, 1280, id="D1280-r0.9"),
    pytest.param(3, 9, 0.5, 100, id="odd-D100"),
    pytest.param(5, 10, 0.75, 33, id="batch5-D33"),
]
# (x, pos_embed) dtypes; the mask token is an fp32 parameter and the output follows type promotion.
DTYPES = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp16", "fp32")]


def _inputs(N, L, ratio, D, xd, pd, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, ids_restore, _ = masking(N, L, ratio, seed)
    n_vis = int(L * (1 - ratio))
    x = torch.randn(N, 1 + n_vis, D, generator=g).to(device=DEVICE, dtype=DT[xd])
    mt = torch.randn(D, generator=g).to(DEVICE)
    pos = torch.randn(1, 1 + L, D, generator=g).to(device=DEVICE, dtype=DT[pd])
    return x, mt, ids_restore, pos


def _expected_forward(x, mt, ids_restore, pos):
    out_dtype = torch.result_type(x, pos)
    if out_dtype != torch.bfloat16:
        return R.unshuffle_scatter(x, mt, ids_restore, pos)
    # bf16 + bf16: PyTorch adds in fp32 and rounds once; the kernel does the same, with the interpreter's rounding.
    ref32 = R.unshuffle_scatter(x.float(), mt.to(x.dtype).float(), ids_restore, pos.float())
    return kernel_downcast(ref32, torch.bfloat16)


@pytest.mark.parametrize("N,L,ratio,D", SHAPES)
@pytest.mark.parametrize("xd,pd", DTYPES[:2])
def test_forward_bit_exact(N, L, ratio, D, xd, pd):
    x, mt, ids_restore, pos = _inputs(N, L, ratio, D, xd, pd)
    got = unshuffle_scatter(x, mt, ids_restore, pos)
    want = _expected_forward(x, mt, ids_restore, pos)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_matches_masked_select_formula():
    """An independent statement of the semantics: start from mask tokens everywhere, write each visible token
    ``x[n, 1+k]`` at its patch ``ids_shuffle[n, k]`` (the inverse of ids_restore), then add the positions."""
    x, mt, ids_restore, pos = _inputs(3, 36, 0.75, 40, "fp32", "fp32", seed=6)
    N, n_tok, D = x.shape
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    want = mt.expand(N, 37, D).clone()
    want[:, 0] = x[:, 0]
    for n in range(N):
        want[n, 1 + ids_shuffle[n, : n_tok - 1]] = x[n, 1:]
    assert torch.equal(unshuffle_scatter(x, mt, ids_restore, pos), want + pos)


@pytest.mark.parametrize("xd,pd", DTYPES[2:])
def test_forward_low_precision_bit_exact(xd, pd):
    x, mt, ids_restore, pos = _inputs(2, 49, 0.75, 192, xd, pd)
    assert torch.equal(unshuffle_scatter(x, mt, ids_restore, pos), _expected_forward(x, mt, ids_restore, pos))


def _mask_token_oracle(grad_out, ids_restore, n_vis, x_dtype, downcast):
    """fp64 sum over batch and masked positions of the output gradient, each term converted to x's dtype by
    ``downcast`` as it is handed to the sum (autograd: ``.to``; the kernel: its in-register conversion)."""
    terms = downcast(grad_out[:, 1:].float(), x_dtype).double()
    masked = (ids_restore >= n_vis).unsqueeze(-1)
    return (terms * masked).sum((0, 1)), (terms.abs() * masked).sum((0, 1))


def _check_grads(N, L, ratio, D, xd, pd, pos_trainable):
    x, mt, ids_restore, pos = _inputs(N, L, ratio, D, xd, pd, seed=3)
    n_vis = x.shape[1] - 1
    leaves = [x.clone().requires_grad_(True), mt.clone().requires_grad_(True), pos.clone().requires_grad_(pos_trainable)]
    out = unshuffle_scatter(leaves[0], leaves[1], ids_restore, leaves[2])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    wrt = leaves if pos_trainable else leaves[:2]
    got = torch.autograd.grad(out, wrt, grad_out)
    ref_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    ref_out = R.unshuffle_scatter(ref_leaves[0], ref_leaves[1], ids_restore, ref_leaves[2])
    ref = torch.autograd.grad(ref_out, ref_leaves if pos_trainable else ref_leaves[:2], grad_out)

    # Visible tokens: pure movement (plus the dtype conversion the reference's promotion implies).
    want_x = ref[0]
    if grad_out.dtype != x.dtype:
        # The kernel converts the gradient in-register (the interpreter's bf16 rounding applies).
        xf = x.float().requires_grad_(True)
        (gxf,) = torch.autograd.grad(R.unshuffle_scatter(xf, mt.to(x.dtype).float(), ids_restore, pos.float()),
                                     xf, grad_out.float())
        want_x = kernel_downcast(gxf, x.dtype)
    assert got[0].dtype == x.dtype and torch.equal(got[0], want_x)

    # Mask token: a reduction, compared with an fp64 oracle (see the module docstring).
    for grad, downcast in ((got[1], kernel_downcast), (ref[1], lambda t, dt: t.to(dt))):
        oracle, abs_sum = _mask_token_oracle(grad_out, ids_restore, n_vis, x.dtype, downcast)
        slack = 4e-7 * abs_sum  # fp32 summation error bound for these sizes
        if x.dtype != torch.float32:
            slack = slack + ulp(oracle, x.dtype).double()  # the final rounding to x's dtype
        assert grad.dtype == mt.dtype
        # Checked for the reference too, to show the bound is a fair one.
        assert ((grad.double() - oracle).abs() <= slack).all()

    if pos_trainable:
        assert got[2].dtype == pos.dtype and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("N,L,ratio,D", SHAPES)
def test_grads_fp32(N, L, ratio, D):
    _check_grads(N, L, ratio, D, "fp32", "fp32", pos_trainable=False)


@pytest.mark.parametrize("xd,pd", DTYPES)
def test_grads_dtypes_trainable_pos(xd, pd):
    _check_grads(3, 49, 0.75, 96, xd, pd, pos_trainable=True)


def test_mask_token_grad_deterministic():
    x, mt, ids_restore, pos = _inputs(4, 64, 0.75, 160, "fp32", "fp32", seed=5)
    mt = mt.requires_grad_(True)
    grads = []
    for _ in range(2):
        out = unshuffle_scatter(x, mt, ids_restore, pos)
        grads.append(torch.autograd.grad(out, mt, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1])


def test_no_visible_token_and_strided_x():
    """Only the cls token visible (x is (N, 1, D)), and x given as a non-contiguous view."""
    x, mt, ids_restore, pos = _inputs(2, 12, 0.75, 40, "fp32", "fp32")
    wide = torch.randn(2, 4, 80, device=DEVICE)
    x_view = wide[:, :, ::2]  # stride 2 on D: the launcher copies
    assert torch.equal(unshuffle_scatter(x_view, mt, ids_restore, pos), R.unshuffle_scatter(x_view, mt, ids_restore, pos))
    x1 = x[:, :1]
    all_masked = torch.arange(12, device=DEVICE).repeat(2, 1)
    assert torch.equal(unshuffle_scatter(x1, mt, all_masked, pos), R.unshuffle_scatter(x1, mt, all_masked, pos))


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("x2d", ValueError, "x must be"),
        ("mt_shape", ValueError, "mask_token"),
        ("pos_shape", ValueError, "pos_embed"),
        ("ids_float", TypeError, "ids_restore"),
        ("too_many_tokens", ValueError, "tokens"),
        ("x_int", TypeError, "x must be fp32"),
    ],
)
def test_bad_input_raises(case, exc, match):
    x, mt, ids_restore, pos = _inputs(2, 16, 0.75, 32, "fp32", "fp32")
    args = {
        "x2d": (x[0], mt, ids_restore, pos),
        "mt_shape": (x, mt[:5], ids_restore, pos),
        "pos_shape": (x, mt, ids_restore, pos[:, :5]),
        "ids_float": (x, mt, ids_restore.float(), pos),
        "too_many_tokens": (torch.zeros(2, 20, 32, device=DEVICE), mt, ids_restore, pos),
        "x_int": (x.to(torch.int32), mt, ids_restore, pos),
    }[case]
    with pytest.raises(exc, match=match):
        unshuffle_scatter(*args)
