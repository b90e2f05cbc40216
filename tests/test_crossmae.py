"""CrossMAE: the cross-attention layer against its formula, partial reconstruction's targets and loss,
the fused path against the reference, compile, the encoder's transfer to timm, and visualization."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from kernel_helpers import DEVICE, INTERPRETER, kernel_module, step_outputs
from torch import nn

from fastmae import CrossMAE, ops
from fastmae.convert import encoder_state_dict, save_timm_encoder
from fastmae.layers import CrossAttention, CrossBlock, set_attention_backend
from fastmae.models import crossmae_vit_tiny, mae_vit_tiny
from fastmae.reference import masked_recon_loss_official


def _eager_cross_attention(layer: CrossAttention, x, mem):
    """softmax(Q K^T / sqrt(d)) V per head, written from the weights with plain matmuls."""
    H, Dh = layer.num_heads, layer.head_dim
    B, Tq, D = x.shape
    q = x @ layer.q.weight.T + layer.q.bias
    kv = mem @ layer.kv.weight.T + layer.kv.bias
    k, v = kv[..., :D], kv[..., D:]
    split = lambda t: t.reshape(B, t.shape[1], H, Dh).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / Dh**0.5, dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, Tq, D)
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cross_attention_equals_formula(backend):
    torch.manual_seed(0)
    layer = CrossAttention(32, 4)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 9, 32)
    set_attention_backend(backend)
    try:
        out = layer(x, mem)
    finally:
        set_attention_backend(None)
    torch.testing.assert_close(out, _eager_cross_attention(layer, x, mem), rtol=1e-5, atol=1e-5)


def _reference_flash(q, k, v, softmax_scale=None):
    """Stand-in for the flash-attn kernels in their (B, T, H, Dh) layout, computed with the formula."""
    att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", att, v)


@pytest.mark.parametrize("kernel", ["flash_attn_2", "flash_attn_3"])
def test_cross_attention_flash_layouts(monkeypatch, kernel):
    """The flash-attn calls get (B, T, H, Dh) queries and packed (B, Tk, 2, H, Dh) keys/values (FA2) or
    separate keys and values (FA3): stand-ins computing the formula in that layout give the formula's result."""
    import sys
    import types

    import fastmae.layers.cross_attention as cross_mod

    calls = []

    def fa2(q, kv, softmax_scale=None):
        calls.append(tuple(kv.shape))
        return _reference_flash(q, kv[:, :, 0], kv[:, :, 1], softmax_scale)

    def fa3(q, k, v, softmax_scale=None):
        calls.append(tuple(k.shape))
        return _reference_flash(q, k, v, softmax_scale), None

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_kvpacked_func=fa2))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=fa3))
    monkeypatch.setattr(cross_mod, "choose_attention_backend", lambda *args: kernel)
    torch.manual_seed(0)
    layer = CrossAttention(32, 4)
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 9, 32)
    out = layer(x, mem)
    assert calls == [(3, 9, 2, 4, 8) if kernel == "flash_attn_2" else (3, 9, 4, 8)]
    torch.testing.assert_close(out, _eager_cross_attention(layer, x, mem), rtol=1e-5, atol=1e-5)


def test_cross_block_decodes_queries_independently():
    torch.manual_seed(0)
    blk = CrossBlock(32, 4)
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 8, 32)
    out = blk(x, mem)
    x2 = x.clone()
    x2[:, 0] += 5.0
    out2 = blk(x2, mem)
    assert not torch.allclose(out2[:, 0], out[:, 0])
    torch.testing.assert_close(out2[:, 1:], out[:, 1:], rtol=0, atol=0)
    # One query alone gives the same row as in the batch of queries.
    torch.testing.assert_close(blk(x[:, 3:4], mem), out[:, 3:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_ratio,prediction_ratio,expected", [(0.75, 0.25, 16), (0.75, 0.5, 32), (0.5, 0.1, 6),
                                                                  (0.75, 1.0, 48)])
@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_targets_are_a_fixed_size_subset_of_the_masked_patches(mask_ratio, prediction_ratio, expected, mask_type):
    torch.manual_seed(0)
    model = crossmae_vit_tiny(mask_type=mask_type)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        _, pred, mask, ids = model.forward_partial(x, mask_ratio, prediction_ratio=prediction_ratio)
    assert ids.shape == (4, expected) and pred.shape == (4, expected, 8 * 8 * 3)
    for n in range(4):
        assert ids[n].unique().numel() == expected
        assert bool((mask[n, ids[n]] == 1).all())
    # Different samples draw different subsets.
    assert len({tuple(sorted(r.tolist())) for r in ids}) == 4


def test_eval_mode_predicts_every_masked_patch():
    torch.manual_seed(0)
    model = crossmae_vit_tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, _, mask, ids = model.forward_partial(x, 0.75)
    assert ids.shape == (2, 48)
    assert torch.equal(torch.zeros_like(mask).scatter(1, ids, 1.0), mask)


def test_loss_is_norm_pix_mse_on_exactly_the_targets():
    torch.manual_seed(0)
    model = crossmae_vit_tiny(norm_pix_loss=True)
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(1)
    loss_p, pred_p, mask, ids = model.forward_partial(x, 0.75)
    torch.manual_seed(1)
    loss, pred, mask2 = model(x, 0.75)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(loss, loss_p, rtol=0, atol=0)
    # The scattered pred holds the compact rows at ids_target and zeros elsewhere.
    P = pred.shape[-1]
    torch.testing.assert_close(torch.gather(pred, 1, ids[..., None].expand(-1, -1, P)), pred_p, rtol=0, atol=0)
    target_mask = torch.zeros_like(mask).scatter(1, ids, 1.0)
    assert bool((pred[target_mask == 0] == 0).all())
    # Official MAE formula weighted by a mask of exactly the predicted patches.
    expected = masked_recon_loss_official(pred.detach(), x, target_mask, 8, norm_pix=True)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", [False, True])
def test_every_parameter_trains(fusion):
    torch.manual_seed(0)
    model = crossmae_vit_tiny(feature_fusion=fusion)
    model(torch.randn(2, 3, 64, 64))[0].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert (model.decoder_fusion is not None) == fusion


@pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETER, reason="needs the Triton interpreter")
@pytest.mark.parametrize("kind,fusion", [("uint8", True), ("fp32", False)])
def test_triton_path_equals_reference(use_backend, monkeypatch, kind, fusion):
    torch.manual_seed(0)
    model = crossmae_vit_tiny(norm_pix_loss=True, feature_fusion=fusion).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    if kind == "uint8":
        imgs = torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8).to(DEVICE)
    else:
        imgs = torch.randn(2, 3, 64, 64, generator=g).to(DEVICE)
    noise = torch.rand(2, 64, generator=g).to(DEVICE)

    def run(backend):
        use_backend(backend)
        assert ops.kernel_backend(DEVICE) == backend
        torch.manual_seed(7)  # the target subset comes from the default generator
        return step_outputs(model, imgs, noise, 0.75)

    loss_r, pred_r, mask_r, grads_r = run("torch")
    launches = _count_launches(monkeypatch, ("patchify_gather", "patchify_gather_fwd"),
                               ("unshuffle_scatter", "unshuffle_scatter_fwd"), ("gather_queries", "gather_queries_fwd"),
                               ("masked_recon_loss", "masked_recon_loss_fwd"))
    loss_k, pred_k, mask_k, grads_k = run("triton")
    # K1, the query gather and K3 run as kernels; K2's full-grid scatter has no place in CrossMAE.
    assert launches == {"patchify_gather_fwd": 1, "gather_queries_fwd": 1, "masked_recon_loss_fwd": 1}
    assert torch.equal(mask_k, mask_r)
    assert torch.equal(pred_k, pred_r)  # K1 and the query gather move data: identical predictions
    torch.testing.assert_close(loss_k, loss_r, rtol=2e-6, atol=0)
    assert grads_k.keys() == grads_r.keys() and "mask_token" in grads_k
    for name, gr in grads_r.items():
        torch.testing.assert_close(grads_k[name], gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item() + 1e-12)


def _count_launches(monkeypatch, *targets: tuple[str, str]) -> dict[str, int]:
    """Count calls of Triton launchers ``(kernel module, function)`` (the ops import them at call time)."""
    counts: dict[str, int] = {}
    for mod_name, fn_name in targets:
        mod = kernel_module(mod_name)
        fn = getattr(mod, fn_name)

        def wrapped(*args, _fn=fn, _name=fn_name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(mod, fn_name, wrapped)
    return counts


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    DEVICE.type == "cpu" and not INTERPRETER, reason="needs the Triton interpreter"))])
def test_compiles_fullgraph(use_backend, backend):
    torch.manual_seed(0)
    model = crossmae_vit_tiny(norm_pix_loss=True).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    imgs = torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8).to(DEVICE)
    noise = torch.rand(2, 64, generator=g).to(DEVICE)
    use_backend(backend)
    torch.manual_seed(3)
    loss_e, _, _, grads_e = step_outputs(model, imgs, noise, 0.75)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss_c, _, _, grads_c = step_outputs(compiled, imgs, noise, 0.75)
    torch._dynamo.reset()
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-6, atol=0)
    for name, gr in grads_e.items():
        torch.testing.assert_close(grads_c[name], gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item() + 1e-12)


def test_encoder_has_mae_names_and_exports_to_timm(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cross = crossmae_vit_tiny(feature_fusion=True)
    mae_enc = encoder_state_dict(mae_vit_tiny().state_dict())
    cross_enc = encoder_state_dict(cross.state_dict())
    assert {k: v.shape for k, v in cross_enc.items()} == {k: v.shape for k, v in mae_enc.items()}
    save_timm_encoder(cross, tmp_path / "enc.safetensors")
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
    ).eval()
    twin.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(cross.eval().forward_features(x), twin.forward_features(x), rtol=1e-5, atol=1e-5)


def test_visualization_runs_on_the_same_contract():
    from fastmae.viz import reconstruct

    torch.manual_seed(0)
    model = crossmae_vit_tiny(norm_pix_loss=True)
    x = torch.randn(2, 3, 64, 64)
    panels = reconstruct(model, x, 0.75, torch.rand(2, 64))
    assert model.training  # restored
    m = panels["mask"]
    assert m.mean().item() == pytest.approx(0.75)
    torch.testing.assert_close(panels["pasted"] * (1 - m), x * (1 - m))
    # Every masked patch got a prediction (eval mode): no patch of the reconstruction is left at its mean.
    rec = model.patchify(panels["reconstruction"])
    masked_rows = rec[model.patchify(m)[..., 0] > 0]
    assert bool((masked_rows.std(dim=-1) > 0).all())


def test_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="prediction_ratio"):
        crossmae_vit_tiny(prediction_ratio=0.0)
    model = crossmae_vit_tiny()
    with pytest.raises(ValueError, match="prediction_ratio"):
        model(torch.randn(1, 3, 64, 64), 0.75, prediction_ratio=1.5)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(1, 3, 64, 64), 0.75, torch.rand(1, 10))
    assert isinstance(model, CrossMAE)


def test_analytic_flops_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from fastmae.methods.crossmae import forward_flops

    # Eager attention: its matmuls are counted (the CPU SDPA kernel is not).
    set_attention_backend("eager")
    try:
        for fusion in (False, True):
            torch.manual_seed(0)
            model = crossmae_vit_tiny(feature_fusion=fusion)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.randn(2, 3, 64, 64), 0.75)
            counted = counter.get_total_flops() / 2
            assert forward_flops(model, 64, 0.75) == pytest.approx(counted, rel=1e-3)
    finally:
        set_attention_backend(None)


@pytest.mark.parametrize("entry", ["train.py", "cli"])
def test_two_training_steps_through_the_loop(tmp_path, demo_dir, fresh_env, entry):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    root = Path(__file__).parent.parent
    head = [sys.executable, "train.py"] if entry == "train.py" else [sys.executable, "-m", "fastmae.cli", "pretrain"]
    cmd = [*head, "--method=crossmae", f"--data={demo_dir}", f"--output_dir={out}", "--max_steps=2", "--log_every=1",
           "--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=fresh_env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"]["name"] == "crossmae" and cfg["model"]["name"] == "crossmae_vit_tiny"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["loss"] > 0 for row in rows)
    assert (out / "reconstructions.png").is_file()
    sd = torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=True)["model"]
    assert "decoder_blocks.0.attn.q.weight" in sd and "decoder_fusion.weight" in sd
    if entry == "cli":  # the run folder is a checkpoint for `fastmae visualize`: rebuilt as CrossMAE, decoded
        from fastmae.eval import visualize

        png = tmp_path / "vis" / "rec.png"
        assert visualize.main([f"--ckpt={out}", "--num_images=2", f"--output={png}"]) == 0
        assert png.stat().st_size > 500


def test_mae_and_crossmae_share_one_decoder_scaffolding_under_the_official_names():
    """The decoder's parts are built in one place (models/decoder.py); the official MAE names stay, so checkpoints
    load with strict=True (the parity suites), and neither model keeps its own copy of the shared helpers."""
    from fastmae.models.decoder import MaskedDecoderViT
    from fastmae.models.mae import MaskedAutoencoderViT

    official = {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
                "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    kw = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=2,
              decoder_num_heads=2)
    for cls in (MaskedAutoencoderViT, CrossMAE):
        assert issubclass(cls, MaskedDecoderViT)
        assert not {"build_decoder", "patchify", "unpatchify", "plan_masking", "draw_mask"} & set(vars(cls)), cls
        names = {k for k in cls(**kw).state_dict() if k.startswith(("decoder_", "mask_token"))}
        assert {k for k in names if not k.startswith(("decoder_blocks.", "decoder_fusion."))} == official
        assert {k.split(".")[1] for k in names if k.startswith("decoder_blocks.")} == {"0", "1"}
