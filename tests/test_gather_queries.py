"""CrossMAE decoder queries (``fastmae.ops.gather_queries``) through the Triton kernel against the eager reference.

The forward is data movement plus one add in fp32, rounded once: bit for bit (bf16 outputs under the
interpreter: ``kernel_helpers.kernel_downcast``), and against an independent one-hot formula. The
gradients are sums over queries in another order than PyTorch's: compared with an fp64 oracle of
the same terms, within fp32 summation error plus one final rounding to the parameter's dtype.
The sm_80 / sm_90 compile check runs ``tools/kernel_compile_report.py --only gather_queries``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, kernel_downcast, masking, ulp

from fastmae import ops
from fastmae import reference as R

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]

# (N, L, L_t, D): the ViT-B decoder (196 patches, 25% predicted), awkward widths and counts.
SHAPES = [
    pytest.param(2, 196, 49, 512, id="vitb-dec512"),
    pytest.param(3, 64, 16, 100, id="D100"),
    pytest.param(5, 16, 1, 33, id="Lt1-D33"),
    pytest.param(1, 256, 64, 1280, id="D1280"),
]
# (mask_token, pos_embed) dtypes; the output follows type promotion.
DTYPES = [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp16")]


@pytest.fixture(autouse=True)
def _triton_backend(use_backend):
    use_backend("triton")


def _inputs(N, L, L_t, D, mtd="fp32", pd="fp32", seed=0):
    """CrossMAE's targets: a random subset of L_t of each sample's masked patches (mask ratio 0.75)."""
    g = torch.Generator().manual_seed(seed)
    _, _, ids_masked = masking(N, L, 0.75, seed)
    pick = torch.argsort(torch.rand(N, ids_masked.shape[1], generator=g), dim=1)[:, :L_t].to(DEVICE)
    ids = torch.gather(ids_masked, 1, pick)
    mt = torch.randn(D, generator=g).to(DEVICE, DT[mtd])
    pos = torch.randn(1, 1 + L, D, generator=g).to(DEVICE, DT[pd])
    return mt, pos, ids


def _expected(mt, pos, ids):
    if torch.result_type(mt, pos) != torch.bfloat16:
        return R.gather_queries(mt, pos, ids)
    # bf16 + bf16: PyTorch adds in fp32 and rounds once; the kernel does the same, with the interpreter's rounding.
    return kernel_downcast(R.gather_queries(mt.float(), pos.float(), ids), torch.bfloat16)


@pytest.mark.parametrize("N,L,L_t,D", SHAPES)
@pytest.mark.parametrize("mtd,pd", DTYPES)
def test_forward_bit_exact(N, L, L_t, D, mtd, pd):
    mt, pos, ids = _inputs(N, L, L_t, D, mtd, pd)
    got = ops.gather_queries(mt, pos, ids)
    want = _expected(mt, pos, ids)
    assert got.dtype == want.dtype == torch.result_type(mt, pos) and got.shape == (N, L_t, D)
    assert torch.equal(got, want)


def test_matches_one_hot_formula_and_int32_ids():
    """Independently: a one-hot (N, L_t, 1+L) matrix times the position table (exact in fp64), plus the token."""
    mt, pos, ids = _inputs(3, 49, 12, 64, seed=1)
    one_hot = F.one_hot(ids + 1, 50).double()
    want = (one_hot @ pos[0].double() + mt.double()).float()
    assert torch.equal(ops.gather_queries(mt, pos, ids.to(torch.int32)), want)


def _oracle(grad_out, ids, L, cast):
    """fp64 sums of the output gradient: over every query (mask token), and per patch (position table, each term
    first converted by ``cast`` as autograd hands it to index_select's backward)."""
    N, L_t, D = grad_out.shape
    terms = cast(grad_out).double()
    per_patch = torch.zeros(L, D, dtype=torch.float64, device=grad_out.device)
    per_patch_abs = torch.zeros_like(per_patch)
    per_patch.index_add_(0, ids.reshape(-1), terms.reshape(-1, D))
    per_patch_abs.index_add_(0, ids.reshape(-1), terms.abs().reshape(-1, D))
    all_terms = grad_out.double()
    return all_terms.sum((0, 1)), all_terms.abs().sum((0, 1)), per_patch, per_patch_abs


def _within(got, oracle, abs_sum, dtype, what):
    slack = 4e-7 * abs_sum  # fp32 summation error bound for these sizes
    if dtype != torch.float32:
        slack = slack + ulp(oracle, dtype).double()  # the final rounding to the parameter's dtype
    assert ((got.double() - oracle).abs() <= slack).all(), f"{what}: {(got.double() - oracle).abs().max():.3g}"


@pytest.mark.parametrize("N,L,L_t,D", SHAPES[:3])
@pytest.mark.parametrize("mtd,pd", DTYPES)
@pytest.mark.parametrize("pos_trainable", [False, True])
def test_grads_against_reference(N, L, L_t, D, mtd, pd, pos_trainable):
    mt, pos, ids = _inputs(N, L, L_t, D, mtd, pd, seed=2)
    leaves = [mt.clone().requires_grad_(True), pos.clone().requires_grad_(pos_trainable)]
    out = ops.gather_queries(leaves[0], leaves[1], ids)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    wrt = leaves if pos_trainable else leaves[:1]
    got = torch.autograd.grad(out, wrt, grad_out)
    ref_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    ref = torch.autograd.grad(R.gather_queries(ref_leaves[0], ref_leaves[1], ids), ref_leaves[: len(wrt)], grad_out)

    def cast(t):
        return kernel_downcast(t, pos.dtype)

    mt_sum, mt_abs, per_patch, per_patch_abs = _oracle(grad_out, ids, L, cast)
    assert got[0].dtype == mt.dtype and got[0].shape == mt.shape
    # The mask token's terms are summed in the output dtype, then rounded to it and to the token's dtype.
    final = mt.dtype if mt.dtype.itemsize < out.dtype.itemsize else out.dtype
    _within(got[0], mt_sum, mt_abs, final, "mask token")
    _within(ref[0], mt_sum, mt_abs, final, "mask token (reference)")  # the bound is a fair one
    if pos_trainable:
        assert got[1].dtype == pos.dtype and got[1].shape == pos.shape
        assert torch.all(got[1][0, 0] == 0)  # the cls slot gets no gradient
        _within(got[1][0, 1:], per_patch, per_patch_abs, pos.dtype, "pos_embed")
        if pos.dtype == torch.float32:
            _within(ref[1][0, 1:], per_patch, per_patch_abs, pos.dtype, "pos_embed (reference)")
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_grads_deterministic_and_exact_for_integers():
    """Integer-valued gradients sum exactly in any order: the kernel's sums equal the reference's bit for bit.
    Repeated runs give identical bits (fixed summation order)."""
    mt, pos, ids = _inputs(6, 64, 16, 96, seed=4)
    grad_out = torch.randint(-8, 9, (6, 16, 96), generator=torch.Generator().manual_seed(5)).float().to(DEVICE)
    results = []
    for impl in (ops.gather_queries, ops.gather_queries, R.gather_queries):
        leaves = (mt.clone().requires_grad_(True), pos.clone().requires_grad_(True))
        results.append(torch.autograd.grad(impl(*leaves, ids), leaves, grad_out))
    for a, b, c in zip(*results, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_opcheck_and_compile_fullgraph():
    mt, pos, ids = _inputs(2, 16, 4, 24, seed=6)
    mt_leaf, pos_leaf = mt.clone().requires_grad_(True), pos.clone().requires_grad_(True)
    f = torch.ops.fastmae
    for op, args in [
        (f.gather_queries, (mt_leaf, pos, ids)),
        (f.gather_queries, (mt_leaf, pos_leaf.detach().bfloat16().requires_grad_(True), ids)),
        (f.gather_queries_backward, (torch.randn(2, 4, 24, device=DEVICE), ids, 16, torch.float32, torch.float32, True)),
        (f.gather_queries_backward, (torch.randn(2, 4, 24, device=DEVICE), ids, 16, torch.float32, torch.float32, False)),
    ]:
        torch.library.opcheck(op, args)

    def queries_loss(mt_, pos_):
        return (ops.gather_queries(mt_, pos_, ids) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(queries_loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(mt_leaf, pos_leaf), (mt_leaf, pos_leaf))
    torch._dynamo.reset()
    want = torch.autograd.grad(queries_loss(mt_leaf, pos_leaf), (mt_leaf, pos_leaf))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reference_backend_is_the_reference(use_backend):
    use_backend("torch")
    mt, pos, ids = _inputs(2, 16, 4, 24, seed=7)
    assert torch.equal(ops.gather_queries(mt, pos, ids), R.gather_queries(mt, pos, ids))


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("mt_2d", ValueError, "mask_token must be"),
        ("pos_shape", ValueError, "pos_embed must be"),
        ("ids_float", TypeError, "ids must be int64"),
        ("ids_1d", ValueError, "ids must be"),
        ("mt_int", TypeError, "mask_token must be fp32"),
        ("too_wide", ValueError, "exceeds"),
    ],
)
def test_bad_input_raises(case, exc, match):
    mt, pos, ids = _inputs(2, 16, 4, 24)
    args = {
        "mt_2d": (mt[None], pos, ids),
        "pos_shape": (mt, pos[:, :, :5], ids),
        "ids_float": (mt, pos, ids.float()),
        "ids_1d": (mt, pos, ids[0]),
        "mt_int": (mt.to(torch.int32), pos, ids),
        "too_wide": (torch.zeros(5000, device=DEVICE), torch.zeros(1, 17, 5000, device=DEVICE), ids),
    }[case]
    with pytest.raises(exc, match=match):
        ops.gather_queries(*args)


def test_kernels_compile_for_sm80_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    script = ROOT / "tools" / "kernel_compile_report.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--subset", "ci", "--only", "gather_queries", "--arch", "80", "90", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"gather_queries fwd", "gather_queries bwd"}
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["error"] is None, f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['error']}"
        assert not r["spills"] and r["local"] == 0 and r["stack"] == 0, f"spill in {r}"
        assert 0 < r["regs"] <= 255
