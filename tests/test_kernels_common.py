"""kernels/_common.py: the launch and validation helpers every kernel module shares, checked on their own
(their kernels' parity tests cover them only through valid inputs)."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels._common import MAX_BLOCK, block_config, check_ids, image_geometry, norm_constants
from fastmae.reference import normalize_uint8


@pytest.mark.parametrize("n", [1, 16, 17, 192, 768, 588, 4096])
def test_block_holds_the_row_in_one_power_of_two(n):
    block, warps = block_config(n)
    assert block >= n and block & (block - 1) == 0 and warps in (1, 2, 4, 8)


def test_block_beyond_the_register_budget_is_a_one_line_error():
    with pytest.raises(ValueError, match=f"patch dim {MAX_BLOCK + 1} exceeds the kernel limit"):
        block_config(MAX_BLOCK + 1)


def test_ids_must_be_integer_rows_of_the_batch_on_the_data_device():
    x = torch.zeros(2, 3)
    check_ids(torch.zeros(2, 5, dtype=torch.int32), 2, x, "ids_keep")
    with pytest.raises(ValueError, match="ids_keep must be a \\(N, L\\) tensor with N = 2"):
        check_ids(torch.zeros(3, 5, dtype=torch.int64), 2, x, "ids_keep")
    with pytest.raises(TypeError, match="int64 or int32"):
        check_ids(torch.zeros(2, 5), 2, x, "ids_keep")
    with pytest.raises(ValueError, match="must be a \\(N, L\\) tensor"):
        check_ids([[0, 1]], 2, x, "ids_keep")


def test_geometry_of_nchw_float_and_nhwc_uint8_is_the_same_grid():
    f = torch.zeros(2, 3, 32, 48)
    u = torch.zeros(2, 32, 48, 3, dtype=torch.uint8)
    assert image_geometry(f, 16)[:4] == image_geometry(u, 16)[:4] == (2, 3, 2, 3)
    assert image_geometry(u, 16)[4] == (32 * 48 * 3, 1, 48 * 3, 3)  # channel stride 1: NHWC read in place


def test_normalization_constants_reproduce_the_reference_bit_for_bit():
    u = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    shift, scale = norm_constants(u, mean, std, 3)
    mine = (u.permute(0, 3, 1, 2).float() - shift.view(1, 3, 1, 1)) * scale.view(1, 3, 1, 1)
    assert torch.equal(mine, normalize_uint8(u, mean, std))
