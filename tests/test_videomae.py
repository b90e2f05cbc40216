"""VideoMAE: tubelet layout and Conv3d parity, loss parity with the paper's formulas (all target norms), CPU run, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastmae.engine.optim import build_adamw
from fastmae.layers import sinusoid_table
from fastmae.methods import get_method
from fastmae.methods.reference_family import tubelet_patchify, videomae_loss
from fastmae.methods.videomae import VideoMAE, pair_frames
from fastmae.reference import patchify


def _tiny(**kw):
    arch = dict(img_size=16, num_frames=4, tubelet_size=2, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return VideoMAE(**{**arch, **kw})


def _to_tpqc(x: torch.Tensor, t: int, p: int, C: int) -> torch.Tensor:
    """fastmae's in-tubelet order (p, q, t, c) -> VideoMAE's (t, p, q, c)."""
    return x.reshape(*x.shape[:-1], p, p, t, C).movedim(-2, -4).reshape(x.shape)


def test_paired_frames_patchify_is_the_tubelet_layout_bit_exact():
    N, C, T, H, W, t, p = 2, 3, 6, 8, 12, 2, 4
    v = torch.randn(N, C, T, H, W)
    ours = patchify(pair_frames(v, t), p).reshape(N, -1, p * p * t * C)
    assert torch.equal(_to_tpqc(ours, t, p, C), tubelet_patchify(v, t, p))
    raw = torch.randint(0, 256, (N, T, H, W, C), dtype=torch.uint8)
    paired = pair_frames(raw, t)  # (N*T', H, W, t*C)
    assert torch.equal(paired.permute(0, 3, 1, 2).float(), pair_frames(raw.permute(0, 4, 1, 2, 3).float(), t))


def test_tubelet_embed_equals_conv3d():
    model = _tiny()
    v = torch.randn(2, 3, 4, 16, 16)
    tubes = patchify(pair_frames(v, 2), 4).reshape(2, -1, 4 * 4 * 2 * 3)
    ours = model.patch_embed(tubes)
    ref = F.conv3d(v, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=(2, 4, 4))
    torch.testing.assert_close(ours, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_sinusoid_table_formula():
    tab = sinusoid_table(7, 6)
    for pos in range(7):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(tab[pos, j].item() - want) < 1e-6


@pytest.mark.parametrize("target_norm", ["tubelet", "channel", "none"])
def test_loss_matches_paper_formula(target_norm):
    torch.manual_seed(0)
    model = _tiny(target_norm=target_norm).eval()
    v = torch.randn(3, 3, 4, 16, 16) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1, 1)
    noise = torch.rand(3, 16)
    loss, pred, mask = model(v, mask_ratio=0.75, noise=noise)
    _, _, _, ids_masked, _ = model.tubelet_mask(v, 0.75, noise)
    assert pred.shape == (3, 2 * 12, 4 * 4 * 2 * 3) and mask.shape == (3, 32)
    ref = videomae_loss(_to_tpqc(pred.detach(), 2, 4, 3), v, ids_masked, 2, 4, target_norm)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_target_norm_variants_differ():
    # Channels with very different scales: per-channel and flat normalization give different targets.
    torch.manual_seed(0)
    v = torch.randn(2, 3, 4, 16, 16) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1, 1)
    noise = torch.rand(2, 16)
    losses = {}
    for norm in ("tubelet", "channel"):
        torch.manual_seed(1)
        losses[norm] = _tiny(target_norm=norm).eval()(v, 0.75, noise)[0].item()
    assert abs(losses["tubelet"] - losses["channel"]) > 1e-3


def test_uint8_input_matches_float_input():
    torch.manual_seed(3)
    model = _tiny().eval()
    raw = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8)
    v = ((raw.float() / 255 - model.pixel_mean) / model.pixel_std).permute(0, 4, 1, 2, 3)
    noise = torch.rand(2, 16)
    l_u8, p_u8, _ = model(raw, 0.75, noise)
    l_f, p_f, _ = model(v, 0.75, noise)
    torch.testing.assert_close(p_u8, p_f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_u8, l_f, rtol=1e-4, atol=1e-5)


def test_encoder_never_reads_masked_tubelets():
    torch.manual_seed(4)
    model = _tiny(target_norm="none").eval()
    v = torch.randn(1, 3, 4, 16, 16)
    noise = torch.rand(1, 16)
    _, _, mask = model(v, 0.75, noise)
    pix = mask.reshape(1, 2, 4, 4)[:, :, None].repeat_interleave(2, 1).reshape(1, 4, 4, 4)
    pix = pix.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, None].bool().expand_as(v)
    changed = torch.where(pix, torch.randn_like(v), v)
    ks, _, ids_keep, _, _ = model.tubelet_mask(v, 0.75, noise)
    with torch.no_grad():
        a = model.forward_encoder(pair_frames(v, 2), ks, ids_keep, torch.float32, None, None)
        b = model.forward_encoder(pair_frames(changed, 2), ks, ids_keep, torch.float32, None, None)
    assert torch.equal(a, b)


def test_state_dict_names_and_conv3d_shape():
    sd = _tiny().state_dict()
    for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight", "decoder_embed.weight",
              "mask_token", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight", "decoder_norm.weight", "decoder_pred.weight"):
        assert k in sd
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 2, 4, 4)


@pytest.mark.parametrize(
    "shape,dtype,kw,msg",
    [
        ((2, 3, 5, 16, 16), torch.float32, {}, "not divisible by the tubelet size"),
        ((2, 3, 6, 16, 16), torch.float32, {}, "clips must be 4 frames"),
        ((2, 3, 4, 16), torch.float32, {}, "5 dims"),
        ((2, 1, 4, 16, 16), torch.float32, {}, "channels"),
        ((2, 3, 4, 16, 16), torch.int32, {}, "dtype"),
        ((2, 3, 4, 16, 16), torch.float32, dict(mask_ratio=0.99), "leaves no visible"),
        ((2, 3, 4, 16, 16), torch.float32, dict(noise=torch.rand(2, 32)), "noise must have shape"),
    ],
)
def test_bad_input_raises_clear_errors(shape, dtype, kw, msg):
    model = _tiny()
    v = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=msg):
        model(v, **kw)


def test_bad_construction():
    with pytest.raises(ValueError, match="not divisible by the tubelet size"):
        _tiny(num_frames=5)
    with pytest.raises(ValueError, match="target_norm"):
        _tiny(target_norm="pixel")


def test_build_model_and_presets():
    from fastmae.config import PretrainConfig

    spec = get_method("videomae")
    for name in ("videomae_tiny", "videomae_vit_base"):
        PretrainConfig.from_flat(**spec.presets[name]).validate()
    cfg = PretrainConfig.from_flat(**spec.presets["videomae_tiny"])
    model = spec.build_model(cfg)
    assert isinstance(model, VideoMAE) and model.target_norm == "tubelet" and model.grid_size == (8, 8, 8)
    cfg.model.norm_pix_loss = False
    assert spec.build_model(cfg).target_norm == "none"
    cfg.method.video_target_norm = "channel"
    assert spec.build_model(cfg).target_norm == "channel"


@pytest.mark.parametrize("target_norm", ["tubelet", pytest.param("channel", marks=pytest.mark.slow)])
def test_tiny_training_run_decreases_loss(target_norm):
    torch.manual_seed(0)
    model = _tiny(target_norm=target_norm, embed_dim=64, num_heads=4, decoder_embed_dim=64, decoder_num_heads=4)
    g = torch.Generator().manual_seed(0)
    # Smooth moving content: a low-frequency pattern shifted by one pixel per frame.
    base = F.interpolate(torch.randn(4, 3, 4, 4, generator=g), size=24, mode="bilinear", align_corners=False)
    v = torch.stack([base[:, :, f:f + 16, f:f + 16] for f in range(4)], dim=2)
    lr = torch.tensor(2e-3)
    opt = build_adamw(model, lr, 0.05, (0.9, 0.95), torch.device("cpu"))
    noise = torch.rand(4, 16, generator=g)
    with torch.no_grad():
        before = model(v, 0.75, noise)[0].item()
    for _ in range(30):
        loss = model(v, mask_ratio=0.75)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(v, 0.75, noise)[0].item()
    print(f"videomae tiny run ({target_norm}): loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


def test_family_models_trace_with_fullgraph():
    """Static shapes, no host syncs: both models compile as one graph (aot_eager keeps the check cheap on CPU)."""
    from fastmae.methods.simmim import SimMIMViT

    torch.manual_seed(0)
    sim = SimMIMViT(img_size=32, patch_size=4, mask_patch_size=8, embed_dim=32, depth=1, num_heads=2)
    vid = _tiny()
    x, xn = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    v, vn = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8), torch.rand(2, 16)
    for model, inp, noise, ratio in ((sim, x, xn, 0.6), (vid, v, vn, 0.75)):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(inp, ratio, noise)[0], model(inp, ratio, noise)[0], rtol=1e-5, atol=1e-6)
        compiled(inp, mask_ratio=ratio)[0].backward()
