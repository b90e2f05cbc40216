"""Mask generators of the MIM family: exact counts, SimMIM's block structure, tube masks constant over time."""

from __future__ import annotations

import math

import pytest
import torch

from fastmae.models.masks import block_mask, block_mask_geometry, tube_mask


@pytest.mark.parametrize("img,cell,p,ratio", [(224, 32, 16, 0.6), (192, 32, 16, 0.6), (64, 16, 8, 0.6), (96, 32, 8, 0.4)])
def test_block_mask_exact_count_and_cells(img, cell, p, ratio):
    cells, scale, n_masked = block_mask_geometry(img, cell, p, ratio)
    assert cells == (img // cell, img // cell) and scale == cell // p
    assert n_masked == math.ceil(cells[0] * cells[1] * ratio)
    N = 5
    mask, ids_masked = block_mask(torch.rand(N, cells[0] * cells[1]), cells, scale, n_masked)
    g = img // p
    assert mask.shape == (N, g * g) and ids_masked.shape == (N, n_masked * scale * scale)
    # Exact count per image (static shapes), and ids_masked lists exactly the masked tokens.
    assert torch.equal(mask.sum(1), torch.full((N,), float(n_masked * scale * scale)))
    for i in range(N):
        assert set(ids_masked[i].tolist()) == set(torch.nonzero(mask[i]).flatten().tolist())
    # Block structure: every scale x scale cell of the token grid is all masked or all visible,
    # and the cell-level mask has exactly n_masked ones.
    grid = mask.reshape(N, cells[0], scale, cells[1], scale)
    per_cell = grid.sum(dim=(2, 4))
    assert torch.all((per_cell == 0) | (per_cell == scale * scale))
    assert torch.equal((per_cell > 0).sum(dim=(1, 2)), torch.full((N,), n_masked))


def test_block_mask_follows_the_noise_ranking():
    cells, scale, n = block_mask_geometry(64, 32, 16, 0.5)  # 2x2 cells, 2 masked, 2x2 tokens each
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.2]])  # cells 1 and 3 have the smallest noise
    mask, _ = block_mask(noise, cells, scale, n)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(mask.reshape(4, 4), expected)


def test_block_mask_ratio_over_many_draws_is_uniform_over_cells():
    cells, scale, n = block_mask_geometry(224, 32, 16, 0.6)
    mask, _ = block_mask(torch.rand(4000, 49), cells, scale, n)
    freq = mask.mean(0)
    assert abs(freq.mean().item() - 30 / 49) < 1e-6
    assert (freq - 30 / 49).abs().max() < 0.04


@pytest.mark.parametrize(
    "img,cell,p,ratio,msg",
    [(224, 24, 16, 0.6, "multiple of the model patch size"), (224, 64, 16, 0.6, "not divisible by mask_patch_size"),
     (224, 32, 16, 1.0, "mask_ratio")],
)
def test_block_mask_geometry_rejects_bad_setups(img, cell, p, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        block_mask_geometry(img, cell, p, ratio)


@pytest.mark.parametrize("Tp,Ls,keep", [(8, 196, 19), (4, 16, 1), (3, 10, 7)])
def test_tube_mask_identical_over_time_with_exact_ratio(Tp, Ls, keep):
    N = 3
    ids_keep_s, ids_masked_s, ids_keep, ids_masked, mask = tube_mask(torch.rand(N, Ls), Tp, keep)
    assert ids_keep.shape == (N, Tp * keep) and ids_masked.shape == (N, Tp * (Ls - keep))
    m = mask.reshape(N, Tp, Ls)
    assert torch.equal(m, m[:, :1].expand_as(m))  # one spatial mask repeated over time
    assert torch.equal(m.sum(-1), torch.full((N, Tp), float(Ls - keep)))
    for i in range(N):
        kept = set(ids_keep[i].tolist())
        masked = set(ids_masked[i].tolist())
        assert kept.isdisjoint(masked) and len(kept | masked) == Tp * Ls
        assert masked == set(torch.nonzero(mask[i]).flatten().tolist())
        assert set((ids_keep[i] % Ls).tolist()) == set(ids_keep_s[i].tolist())
        # slice-major order: token t*Ls + s
        assert torch.equal(ids_keep[i].reshape(Tp, keep) // Ls, torch.arange(Tp)[:, None].expand(Tp, keep))


def test_mask_types_are_a_table_of_generators_that_config_and_models_consult(monkeypatch):
    """A new entry in MASK_TYPES (a generator and its constraint) is all a mask type needs: the config accepts it,
    the model builds with it, mae_mask_keys runs its generator, and its constraint refuses in every place."""
    from fastmae.config import PretrainConfig
    from fastmae.models.mae import MaskedAutoencoderViT
    from fastmae.models.masks import MASK_TYPES, MaskType, mae_mask_keys, mask_type_problem

    reverse = MaskType(lambda noise, gh, gw, len_keep: 1.0 - noise, ratio=0.5, even_grid=True, needs="test type")
    monkeypatch.setitem(MASK_TYPES, "reverse", reverse)
    noise = torch.rand(2, 16)
    assert torch.equal(mae_mask_keys(noise, (4, 4), 8, "reverse"), 1.0 - noise)
    PretrainConfig.from_flat(mask_type="reverse", mask_ratio=0.5).validate()
    model = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                                 decoder_depth=1, decoder_num_heads=2, mask_type="reverse")
    assert model.mask_type == "reverse"
    with pytest.raises(ValueError, match="mask_type=reverse test type: it needs mask_ratio 0.5") as config_error:
        PretrainConfig.from_flat(mask_type="reverse", mask_ratio=0.75).validate()
    assert str(config_error.value) == mask_type_problem("reverse", 0.75)  # one place words the constraint
    with pytest.raises(ValueError, match="even patch grid"):
        MaskedAutoencoderViT(img_size=12, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2, mask_type="reverse")
    with pytest.raises(ValueError, match="mask_ratio 0.5"):
        mae_mask_keys(noise, (4, 4), 4, "reverse")


def test_an_odd_grid_is_refused_when_the_model_is_built_not_at_the_first_step():
    from fastmae.models.crossmae import CrossMAE
    from fastmae.models.mae import MaskedAutoencoderViT

    for cls in (MaskedAutoencoderViT, CrossMAE):
        with pytest.raises(ValueError, match="mask_type=grid .*even patch grid .*3x3"):
            cls(img_size=12, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2, mask_type="grid")
