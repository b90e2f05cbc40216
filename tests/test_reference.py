"""The eager reference ops against the paper's formulas, stated independently here."""

from __future__ import annotations

import pytest
import torch

from fastmae import reference as R


def _patch_by_loops(imgs: torch.Tensor, p: int) -> torch.Tensor:
    # The definition spelled out pixel by pixel: patch (i, j) row-major, pixels as (p, q, c).
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    out = torch.empty(N, h * w, p * p * C, dtype=imgs.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for c in range(C):
                        out[:, i * w + j, (a * p + b) * C + c] = imgs[:, c, i * p + a, j * p + b]
    return out


@pytest.mark.parametrize("C,H,W,p", [(3, 8, 12, 4), (1, 6, 6, 3), (2, 4, 8, 2)])
def test_patchify_matches_pixel_definition(C, H, W, p):
    imgs = torch.randn(2, C, H, W)
    assert torch.equal(R.patchify(imgs, p), _patch_by_loops(imgs, p))


@pytest.mark.parametrize("C,p,g", [(3, 16, (14, 14)), (3, 14, (4, 4)), (1, 4, (3, 5))])
def test_unpatchify_inverts_patchify_bit_exact(C, p, g):
    imgs = torch.randn(2, C, g[0] * p, g[1] * p)
    x = R.patchify(imgs, p)
    back = R.unpatchify(x, p, C, grid_size=None if g[0] == g[1] else g)
    assert torch.equal(back, imgs)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        R.patchify(torch.zeros(1, 3, 30, 32), 16)


def test_random_masking_ids_and_mask():
    torch.manual_seed(0)
    noise = torch.rand(4, 196)
    ids_keep, ids_restore, mask, ids_shuffle = R.random_masking(noise, 49)
    ar = torch.arange(196).expand(4, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), ar)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), ar)
    # The kept patches are those with the smallest noise, and they are exactly the mask's zeros.
    kept_by_noise = noise.argsort(1)[:, :49].sort(1).values
    assert torch.equal(ids_keep.sort(1).values, kept_by_noise)
    assert torch.equal(mask.sum(1), torch.full((4,), 147.0))
    assert torch.equal((mask == 0).nonzero()[:, 1].reshape(4, 49), kept_by_noise)


def test_uint8_normalization_is_torchvision_within_an_ulp():
    imgs = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    got = R.normalize_uint8(imgs, mean, std)
    tv = (imgs.permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(got, tv, rtol=2e-6, atol=2e-6)


def test_patchify_gather_uint8_equals_float_path():
    imgs = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    ids = torch.tensor([[3, 0, 15], [7, 8, 1]])
    a = R.patchify_gather(imgs, ids, 4, mean, std)
    b = R.patchify_gather(R.normalize_uint8(imgs, mean, std), ids, 4)
    assert torch.equal(a, b)
    full = R.patchify(R.normalize_uint8(imgs, mean, std), 4)
    assert torch.equal(a[1, 0], full[1, 7])


def test_norm_pix_target_uses_unbiased_variance():
    # One patch whose target we compute by hand: values 0..P-1.
    p = 2
    imgs = torch.arange(4, dtype=torch.float32).reshape(1, 1, 2, 2)
    x = torch.arange(4, dtype=torch.float32)
    var_unbiased = ((x - x.mean()) ** 2).sum() / 3
    target = (x - x.mean()) / torch.sqrt(var_unbiased + 1e-6)
    pred = torch.zeros(1, 1, 4)
    loss = R.masked_recon_loss(pred, imgs, torch.tensor([[0]]), p, norm_pix=True)
    torch.testing.assert_close(loss, (target**2).mean())
    biased = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-6)
    assert not torch.allclose(loss, (biased**2).mean())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_loss_equals_official_weighted_form(norm_pix):
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32)
    pred = torch.randn(3, 64, 48)
    ids_keep, ids_restore, mask, ids_shuffle = R.random_masking(torch.rand(3, 64), 16)
    ours = R.masked_recon_loss(pred, imgs, ids_shuffle[:, 16:], 4, norm_pix)
    official = R.masked_recon_loss_official(pred, imgs, mask, 4, norm_pix)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-7)
    # Masked-only predictions give the same loss.
    idx = ids_shuffle[:, 16:, None].expand(-1, -1, 48)
    torch.testing.assert_close(R.masked_recon_loss(torch.gather(pred, 1, idx), imgs, ids_shuffle[:, 16:], 4, norm_pix), ours)


def test_masked_loss_ignores_visible_patches_and_l1():
    imgs = torch.randn(1, 3, 8, 8)
    target = R.patchify(imgs, 4)
    pred = target.clone()
    pred[0, 0] += 100.0  # a visible patch: must not count
    pred[0, 3] += 1.0
    ids_masked = torch.tensor([[3, 1]])
    assert R.masked_recon_loss(pred, imgs, ids_masked, 4, norm_pix=False).item() == pytest.approx(0.5)
    assert R.masked_recon_loss(pred, imgs, ids_masked, 4, norm_pix=False, loss_type="l1").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_type"):
        R.masked_recon_loss(pred, imgs, ids_masked, 4, loss_type="huber")


def test_unshuffle_scatter_places_tokens():
    N, L, D, keep = 2, 6, 4, 2
    ids_keep, ids_restore, mask, ids_shuffle = R.random_masking(torch.rand(N, L), keep)
    x = torch.randn(N, 1 + keep, D)
    mt = torch.randn(D)
    pos = torch.randn(1, 1 + L, D)
    out = R.unshuffle_scatter(x, mt, ids_restore, pos)
    for n in range(N):
        torch.testing.assert_close(out[n, 0], x[n, 0] + pos[0, 0], rtol=0, atol=0)
        for j in range(L):
            if mask[n, j] == 0:
                slot = (ids_keep[n] == j).nonzero().item()
                expected = x[n, 1 + slot]
            else:
                expected = mt
            torch.testing.assert_close(out[n, 1 + j], expected + pos[0, 1 + j], rtol=0, atol=0)
