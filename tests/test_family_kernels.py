"""SimMIM and VideoMAE through the Triton kernels (``FASTMAE_KERNELS=triton``; the interpreter on CPU) equal the
reference path: SimMIM uses K1 on every patch and K3's L1 mode; VideoMAE runs K1 and K3 unchanged on its
paired-frame images (t*C = 6 channels), so no tubelet kernel is needed for the "tubelet" and "none" targets."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETER, step_outputs

from fastmae import ops
from fastmae.methods.simmim import SimMIMViT
from fastmae.methods.videomae import VideoMAE

pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETER, reason="needs the Triton interpreter")


def _compare(model, x, noise, ratio, use_backend):
    use_backend("torch")
    ref = step_outputs(model, x, noise, ratio)
    use_backend("triton")
    assert ops.kernel_backend(DEVICE) == "triton"
    got = step_outputs(model, x, noise, ratio)
    assert torch.equal(got[2], ref[2])
    assert torch.equal(got[1], ref[1])  # K1 is pure data movement: predictions match bit for bit
    torch.testing.assert_close(got[0], ref[0], rtol=2e-6, atol=0)
    assert got[3].keys() == ref[3].keys()
    for name, g in ref[3].items():
        scale = g.abs().max().item()
        torch.testing.assert_close(got[3][name], g, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["uint8", "fp32"])
def test_simmim_triton_equals_reference(use_backend, kind):
    torch.manual_seed(0)
    model = SimMIMViT(img_size=32, patch_size=4, mask_patch_size=8, embed_dim=32, depth=1, num_heads=2).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    if kind == "uint8":
        x = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(2, 3, 32, 32, generator=g)
    _compare(model, x.to(DEVICE), torch.rand(2, 16, generator=g).to(DEVICE), 0.6, use_backend)


@pytest.mark.parametrize("kind,target_norm", [("uint8", "tubelet"), ("fp32", "none")])
def test_videomae_triton_equals_reference(use_backend, kind, target_norm):
    torch.manual_seed(0)
    model = VideoMAE(img_size=16, num_frames=4, tubelet_size=2, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, target_norm=target_norm).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    if kind == "uint8":
        x = torch.randint(0, 256, (2, 4, 16, 16, 3), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(2, 3, 4, 16, 16, generator=g)
    _compare(model, x.to(DEVICE), torch.rand(2, 16, generator=g).to(DEVICE), 0.75, use_backend)
