"""The MAE paper's ablations as switches: mask types, loss on all patches, mask tokens in the encoder,
decoder shape keys. Each against an independent statement of its semantics, each through the fused
kernels against the reference path, and all through the real training loop."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETER, kernel_module, step_outputs

from fastmae.config import parse_overrides
from fastmae.convert import encoder_state_dict
from fastmae.layers import set_attention_backend
from fastmae.methods.registry import get_method
from fastmae.methods.simmim import simmim_vit_tiny
from fastmae.models import mae_vit_tiny
from fastmae.models.masks import mae_mask_keys
from fastmae.reference import masked_recon_loss_official, random_masking, unpatchify

ROOT = Path(__file__).parent.parent
needs_triton = pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETER, reason="needs the Triton interpreter")


def _mask(noise, grid, ratio, mask_type):
    L = grid[0] * grid[1]
    len_keep = int(L * (1 - ratio))
    _, _, mask, ids_shuffle = random_masking(mae_mask_keys(noise, grid, len_keep, mask_type), len_keep)
    return mask, ids_shuffle, len_keep


def _masked_neighbour_fraction(mask: torch.Tensor, grid) -> float:
    """Of the 4-neighbours of masked patches, the fraction that are masked too."""
    m = mask.reshape(-1, *grid)
    pairs = (m[:, 1:, :] * m[:, :-1, :]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()
    edges = (m[:, 1:, :] + m[:, :-1, :]).sum() / 2 + (m[:, :, 1:] + m[:, :, :-1]).sum() / 2
    return (pairs / edges).item()


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (14, 14), (6, 10)])
@pytest.mark.parametrize("ratio", [0.4, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_every_sample_masks_exactly_maes_count(grid, ratio, mask_type):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, grid[0] * grid[1], generator=g)
    mask, ids_shuffle, len_keep = _mask(noise, grid, ratio, mask_type)
    L = grid[0] * grid[1]
    assert bool((mask.sum(1) == L - len_keep).all())
    # The masked ids are the tail of the shuffle, without repeats, and agree with the mask.
    masked = ids_shuffle[:, len_keep:]
    assert bool((torch.sort(ids_shuffle, 1).values == torch.arange(L)).all())
    assert bool((mask.gather(1, masked) == 1).all())


def test_random_keys_are_the_noise_and_masks_are_a_function_of_the_noise():
    noise = torch.rand(4, 196)
    assert torch.equal(mae_mask_keys(noise, (14, 14), 49, "random"), noise)
    assert torch.equal(_mask(noise, (14, 14), 0.75, "block")[0], _mask(noise.clone(), (14, 14), 0.75, "block")[0])


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_masks_are_contiguous(ratio):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(256, 196, generator=g)
    block = _masked_neighbour_fraction(_mask(noise, (14, 14), ratio, "block")[0], (14, 14))
    rand = _masked_neighbour_fraction(_mask(noise, (14, 14), ratio, "random")[0], (14, 14))
    # Random masks: a masked patch's neighbour is masked with probability ~ratio; blocks keep it near 1.
    assert rand == pytest.approx(ratio, abs=0.03)
    assert block > 0.9


def test_grid_keeps_one_patch_of_every_two_by_two():
    noise = torch.rand(3, 64)
    mask, _, _ = _mask(noise, (8, 8), 0.75, "grid")
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = 1.0 - ((r % 2 == 0) & (c % 2 == 0)).float().reshape(1, 64)
    assert torch.equal(mask, expected.expand(3, 64))
    with pytest.raises(ValueError, match="mask_ratio 0.75"):
        _mask(noise, (8, 8), 0.5, "grid")
    with pytest.raises(ValueError, match="even patch grid"):
        _mask(torch.rand(1, 49), (7, 7), 0.75, "grid")


def test_loss_on_all_is_the_official_formula_over_every_patch():
    torch.manual_seed(0)
    model = mae_vit_tiny(norm_pix_loss=True, loss_on="all")
    x = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(x, 0.75)
    everything = torch.ones_like(mask)
    torch.testing.assert_close(loss.detach(), masked_recon_loss_official(pred.detach(), x, everything, 8, True),
                               rtol=1e-5, atol=1e-6)
    default = mae_vit_tiny(norm_pix_loss=True)
    default.load_state_dict(model.state_dict())
    loss_m, pred_m, mask_m = default(x, 0.75, torch.rand(2, 64))
    torch.testing.assert_close(loss_m.detach(), masked_recon_loss_official(pred_m.detach(), x, mask_m, 8, True),
                               rtol=1e-5, atol=1e-6)


def test_encoder_mask_tokens_equals_simmims_encoder_and_never_sees_masked_pixels():
    torch.manual_seed(0)
    model = mae_vit_tiny(encoder_mask_tokens=True, norm_pix_loss=True).eval()
    assert model.mask_token.shape == (1, 1, 192)
    twin = simmim_vit_tiny(mask_patch_size=8)
    missing, unexpected = twin.load_state_dict({**encoder_state_dict(model.state_dict()), "mask_token": model.mask_token},
                                               strict=False)
    assert missing == ["decoder_pred.weight", "decoder_pred.bias"] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    mask = _mask(noise, (8, 8), 0.75, "random")[0]
    with torch.no_grad():
        latent = model.forward_encoder_with_mask_tokens(x, mask, (8, 8))
        torch.testing.assert_close(latent, twin.forward_encoder(x, mask), rtol=1e-6, atol=1e-6)
        # Masked pixels never reach the encoder: replacing them changes nothing the model predicts.
        _, pred, mask2 = model(x, 0.75, noise)
        m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192), 8, 3)
        _, pred_other, _ = model(x * (1 - m) + 5.0 * torch.randn_like(x) * m, 0.75, noise)
    assert torch.equal(mask2, mask)
    torch.testing.assert_close(pred_other, pred, rtol=0, atol=0)


def test_encoder_mask_tokens_multiplies_encoder_flops():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = mae_vit_tiny(encoder_mask_tokens=True)
    x = torch.randn(1, 3, 64, 64)
    mask, ids_shuffle, len_keep = _mask(torch.rand(1, 64), (8, 8), 0.75, "random")
    set_attention_backend("eager")  # its matmuls are counted (the CPU SDPA kernel is not)
    try:
        with FlopCounterMode(display=False) as visible, torch.no_grad():
            model.forward_features(x, ids_shuffle[:, :len_keep])
        with FlopCounterMode(display=False) as everything, torch.no_grad():
            model.forward_encoder_with_mask_tokens(x, mask, (8, 8))
    finally:
        set_attention_backend(None)
    # 65 tokens instead of 17: 3.8x the linear layers, more for attention (the paper: 3.3x for the whole ViT-L model).
    ratio = everything.get_total_flops() / visible.get_total_flops()
    assert 3.8 < ratio < 4.5


SWITCHES = [
    dict(mask_type="block"),
    dict(mask_type="grid"),
    dict(loss_on="all"),
    dict(encoder_mask_tokens=True),
    dict(mask_type="block", loss_on="all", encoder_mask_tokens=True),
    dict(decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2),
]


def _count_launches(monkeypatch) -> dict[str, int]:
    counts: dict[str, int] = {}
    for mod_name in ("patchify_gather", "unshuffle_scatter", "masked_recon_loss"):
        mod = kernel_module(mod_name)
        name = f"{mod_name}_fwd"
        fn = getattr(mod, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(mod, name, wrapped)
    return counts


@needs_triton
@pytest.mark.parametrize("kw", SWITCHES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_switch_through_kernels_equals_reference(use_backend, monkeypatch, kw):
    torch.manual_seed(0)
    model = mae_vit_tiny(norm_pix_loss=True, **kw).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8).to(DEVICE)
    noise = torch.rand(2, 64, generator=g).to(DEVICE)
    use_backend("torch")
    loss_r, pred_r, mask_r, grads_r = step_outputs(model, imgs, noise, 0.75)
    use_backend("triton")
    counts = _count_launches(monkeypatch)
    loss_k, pred_k, mask_k, grads_k = step_outputs(model, imgs, noise, 0.75)
    scatter = 0 if kw.get("encoder_mask_tokens") else 1
    assert counts == {"patchify_gather_fwd": 1, "masked_recon_loss_fwd": 1, **({"unshuffle_scatter_fwd": 1} if scatter else {})}
    assert torch.equal(mask_k, mask_r)
    assert torch.equal(pred_k, pred_r)
    torch.testing.assert_close(loss_k, loss_r, rtol=2e-6, atol=0)
    assert grads_k.keys() == grads_r.keys() and "mask_token" in grads_k
    for name, gr in grads_r.items():
        torch.testing.assert_close(grads_k[name], gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item() + 1e-12)


def test_all_switches_compile_fullgraph(use_backend):
    torch.manual_seed(0)
    model = mae_vit_tiny(norm_pix_loss=True, mask_type="block", loss_on="all", encoder_mask_tokens=True)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    use_backend("torch")
    loss_e, _, _, grads_e = step_outputs(model, x, noise, 0.75)
    torch._dynamo.reset()
    loss_c, _, _, grads_c = step_outputs(torch.compile(model, fullgraph=True, backend="aot_eager"), x, noise, 0.75)
    torch._dynamo.reset()
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=0)
    for name, gr in grads_e.items():
        torch.testing.assert_close(grads_c[name], gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item() + 1e-12)


def test_config_keys_reach_the_model():
    cfg = parse_overrides(["--mask_type=block", "--loss_on=all", "--encoder_mask_tokens=true", "--decoder_depth=1",
                           "--decoder_embed_dim=64", "--decoder_num_heads=2"])
    model = get_method("mae").build_model(cfg)
    assert (model.mask_type, model.loss_on, model.encoder_mask_tokens) == ("block", "all", True)
    assert len(model.decoder_blocks) == 1 and model.decoder_embed_dim == 64
    assert model.decoder_blocks[0].attn.num_heads == 2
    cross = get_method("crossmae").build_model(parse_overrides(["--method=crossmae", "--decoder_depth=3",
                                                                "--prediction_ratio=0.5", "--feature_fusion=false"]))
    assert len(cross.decoder_blocks) == 3 and cross.prediction_ratio == 0.5 and cross.decoder_fusion is None
    with pytest.raises(ValueError, match="^--loss_on is a key of --method=mae; --method=crossmae does not take it$"):
        parse_overrides(["--method=crossmae", "--loss_on=all"])


@pytest.mark.parametrize("args,message", [
    (["--mask_type=checker"], "mask_type must be one of random, block, grid"),
    (["--mask_type=grid", "--mask_ratio=0.6"], "mask_type=grid keeps one patch of every 2x2 cell"),
    (["--loss_on=visible"], "loss_on must be masked or all"),
    (["--decoder_embed_dim=100", "--decoder_num_heads=16"], "not divisible by decoder_num_heads"),
    (["--method=crossmae", "--prediction_ratio=2"], "prediction_ratio must be in"),
    (["--method=crossmae", "--feature_fusion=maybe"], "--feature_fusion expects true/false"),
    (["--augment=mixup"], "augment must be one of"),
])
def test_bad_values_are_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(args)


def test_switches_run_through_the_training_loop(tmp_path, demo_dir, fresh_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", "--max_steps=2", "--log_every=1",
           "--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false",
           "--precision=fp32", "--mask_type=block", "--loss_on=all", "--encoder_mask_tokens=true", "--decoder_depth=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=fresh_env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = json.loads((out / "config.json").read_text())
    m = cfg["method"]
    assert (m["mask_type"], m["loss_on"], m["encoder_mask_tokens"], m["decoder_depth"]) == ("block", "all", True, 1)
    sd = torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=True)["model"]
    assert sd["mask_token"].shape == (1, 1, 192) and "decoder_blocks.1.norm1.weight" not in sd



# ---- the MAE paper's augmentation table (build_loader's augment, the pretraining loader's --augment) -------------


def _batches(root, augment, seed=0, loader="torch"):
    from fastmae.data import build_loader

    ld = build_loader(str(root), batch_size=4, img_size=32, augment=augment, num_workers=0, output="uint8", seed=seed,
                      loader=loader, shuffle=False, drop_last=True)
    ld.set_epoch(0)
    return next(iter(ld))[0]


def test_augment_none_is_the_eval_geometry_and_crop_flip_is_maes(demo_dir):
    assert torch.equal(_batches(demo_dir, "none"), _batches(demo_dir, "eval"))
    assert torch.equal(_batches(demo_dir, "crop_flip"), _batches(demo_dir, "mae"))
    assert not torch.equal(_batches(demo_dir, "crop_flip"), _batches(demo_dir, "none"))


def test_augment_crop_is_a_fixed_size_window_at_a_random_place(demo_dir):
    import numpy as np
    from PIL import Image

    from fastmae.data import build_loader
    from fastmae.data.augment import fixed_crop_params_batch

    W, H = np.array([300, 300, 120, 80]), np.array([200, 400, 120, 100])
    p = fixed_crop_params_batch(0, 0, np.arange(4), W, H)
    side = (np.minimum(W, H) * 0.875).astype(int)
    assert (p[:, 2] == side).all() and (p[:, 3] == side).all()
    assert ((p[:, 0] >= 0) & (p[:, 0] + side <= W) & (p[:, 1] >= 0) & (p[:, 1] + side <= H)).all()
    many = fixed_crop_params_batch(0, 0, np.arange(400), np.full(400, 300), np.full(400, 200))
    assert len(set(map(tuple, many[:, :2].tolist()))) > 100 and 0.4 < many[:, 4].mean() < 0.6
    # The loader cuts exactly that window (PIL crop, bicubic resize, flip), a pure function of (seed, epoch, index).
    ld = build_loader(str(demo_dir), batch_size=4, img_size=32, augment="crop", num_workers=0, output="uint8", seed=5,
                      shuffle=False)
    ld.set_epoch(0)
    got = next(iter(ld))[0]
    src = ld.source
    for i in range(4):
        w, h = src.sizes[i]
        left, top, cw, ch, flip = fixed_crop_params_batch(5, 0, [i], [w], [h])[0].tolist()
        with Image.open(io.BytesIO(src.read_bytes(i))) as im:
            im = im.convert("RGB").crop((left, top, left + cw, top + ch)).resize((32, 32), Image.BICUBIC)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        assert torch.equal(got[i], torch.from_numpy(np.array(im)))


def test_augment_crop_color_is_crop_flip_then_the_jitter_formula(demo_dir):
    import numpy as np

    from fastmae.data.augment import COLOR_DRAW, sample_uniforms

    base = _batches(demo_dir, "crop_flip", seed=3)
    jit = _batches(demo_dir, "crop_color", seed=3)
    assert jit.shape == base.shape and not torch.equal(jit, base)
    for i in range(4):
        b, c, s = 1 + 0.4 * (2 * sample_uniforms(3, 0, [i], COLOR_DRAW + 3)[0, COLOR_DRAW:] - 1)
        x = base[i].numpy().astype(np.float64) * b
        gray = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
        x = (x - gray.mean()) * c + gray.mean()
        gray = (x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114)[..., None]
        x = np.clip(np.rint((x - gray) * s + gray), 0, 255)
        # Same formula, summation order of the gray weights may differ: at most one level off.
        assert np.abs(x - jit[i].numpy()).max() <= 1
    assert torch.equal(_batches(demo_dir, "crop_color", seed=3), jit)


def test_augment_key_reaches_the_training_loader_only(demo_dir):
    cfg = parse_overrides(["--augment=crop", f"--data={demo_dir}", "--img_size=32", "--batch_size=4", "--num_workers=0"])
    spec = get_method("mae")
    train = spec.build_loader(cfg, 0, 1, "cpu", "train", "uint8")
    val = spec.build_loader(cfg, 0, 1, "cpu", "val", "uint8")
    assert train.dataset.augment == "crop" and val.dataset.augment == "eval"


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_dali_cuts_the_same_windows_as_the_torch_loader(tmp_path, augment):
    pytest.importorskip("nvidia.dali")
    from test_data_helpers import write_folder

    from fastmae.data import build_loader

    folder = write_folder(tmp_path / "f", per_class=4)
    kw = dict(batch_size=8, img_size=32, augment=augment, num_workers=0, seed=4, output="uint8")
    d = next(iter(build_loader(folder, loader="dali", **kw)))[0]
    t = next(iter(build_loader(folder, loader="torch", **kw)))[0]
    # Same windows and flips; pixels differ only by the decoders' / resamplers' rounding (as test_data_dali's bound).
    diff = (d.float() - t.float()).abs()
    assert d.shape == t.shape and diff.mean() < 1.5 and diff.flatten(1).mean(1).max() < 4.0


def test_crop_color_on_dali_falls_back_to_the_torch_loader(demo_dir):
    pytest.importorskip("nvidia.dali")
    from fastmae.data import build_loader

    ld = build_loader(str(demo_dir), batch_size=4, img_size=32, augment="crop_color", loader="dali", num_workers=0)
    assert type(ld).__name__ == "TorchLoader"
