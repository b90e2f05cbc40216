"""The compute levers of issue 22, on CPU: each off by default, each leaving the official path alone when off."""

from __future__ import annotations

import json

import pytest
import torch

from fastmae import ops
from fastmae.models.mae import create_model

# ---- lever 2: the decoder position table in the autocast dtype ------------------------------------------------


def _decoder_inputs(monkeypatch, model, imgs, noise) -> list[torch.Tensor]:
    """Run one bf16-autocast forward and return what K2 (ops.unshuffle_scatter) handed the decoder."""
    seen = []
    real = ops.unshuffle_scatter

    def spy(*args):
        out = real(*args)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(ops, "unshuffle_scatter", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs, noise=noise)
    return seen


def test_decoder_input_follows_autocast_and_the_checkpoint_keeps_the_fp32_table(monkeypatch):
    torch.manual_seed(0)
    official = create_model("mae_vit_tiny")
    torch.manual_seed(0)
    lever = create_model("mae_vit_tiny", decoder_input_dtype="autocast")
    sd_o, sd_l = official.state_dict(), lever.state_dict()
    assert list(sd_o) == list(sd_l)  # same names, same order: official checkpoints load strict
    assert all(torch.equal(sd_o[k], sd_l[k]) and sd_o[k].dtype == sd_l[k].dtype for k in sd_o)
    assert sd_l["decoder_pos_embed"].dtype == torch.float32
    lever.load_state_dict(sd_o, strict=True)

    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    (out_o,) = _decoder_inputs(monkeypatch, official, imgs, noise)
    (out_l,) = _decoder_inputs(monkeypatch, lever, imgs, noise)
    assert out_o.dtype == torch.float32 and out_l.dtype == torch.bfloat16
    # The bf16 input is the fp32 one rounded, plus the table's own rounding (|pos| <= 1: at most 2**-9 absolute).
    torch.testing.assert_close(out_l.float(), out_o, rtol=2**-8, atol=2**-8)
    # Without autocast nothing changes: fp32 in, fp32 out.
    with torch.no_grad():
        assert lever.decoder_pos_embed_for(lever.patch_embed.grid_size).dtype == torch.float32


def test_decoder_input_autocast_loss_and_gradients_match_the_fp32_path_within_bf16():
    torch.manual_seed(0)
    a = create_model("mae_vit_tiny", norm_pix_loss=True)
    b = create_model("mae_vit_tiny", norm_pix_loss=True, decoder_input_dtype="autocast")
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(4, 3, 64, 64), torch.rand(4, 64)
    losses, grads = [], []
    for m in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(imgs, noise=noise)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.decoder_embed.weight.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-2 * grads[0].abs().max().item())


def test_decoder_input_auto_follows_the_residual_stream():
    assert create_model("mae_vit_tiny").decoder_input_dtype == "fp32"
    assert create_model("mae_vit_tiny", residual_dtype="bf16").decoder_input_dtype == "autocast"
    assert create_model("mae_vit_tiny", residual_dtype="bf16", decoder_input_dtype="fp32").decoder_input_dtype == "fp32"
    with pytest.raises(ValueError, match="decoder_input_dtype must be one of"):
        create_model("mae_vit_tiny", decoder_input_dtype="bf16")


def test_crossmae_queries_follow_the_decoder_input_dtype_and_the_run_keys_reach_it(monkeypatch):
    """CrossMAE shares MAE's decoder scaffolding: its query gather writes bf16 queries with the bf16 table, and the
    run's residual_dtype / decoder_input_dtype reach the model (both were ignored before)."""
    from fastmae import ops as fops
    from fastmae.config import parse_overrides
    from fastmae.methods.registry import get_method
    from fastmae.models.crossmae import CrossMAE

    seen = []
    real = fops.gather_queries
    monkeypatch.setattr(fops, "gather_queries", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    kw = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=4)
    torch.manual_seed(0)
    official = CrossMAE(**kw)
    lever = CrossMAE(**kw, decoder_input_dtype="autocast")
    lever.load_state_dict(official.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    for m in (official, lever):
        torch.manual_seed(1)  # the same subset of masked patches to predict
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(imgs, noise=noise)
    assert (seen[0].dtype, seen[1].dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(seen[1].float(), seen[0], rtol=2**-8, atol=2**-8)
    cfg = parse_overrides(["--method=crossmae", "--residual_dtype=bf16", "--decoder_input_dtype=autocast"])
    model = get_method("crossmae").build_model(cfg)
    assert (model.decoder_input_dtype, model.residual_dtype) == ("autocast", "bf16")
    assert {b.residual_dtype for b in model.decoder_blocks} == {torch.bfloat16}


def test_k2_bytes_at_batch_256_halve_with_a_bf16_decoder_input():
    from fastmae.engine.levers import k2_bytes

    # ViT-B/16: 196 patches, 49 visible, decoder width 512; counted by hand in bench/reports/2026-11-30-kernels.md.
    fp32 = k2_bytes(256, 196, 49, 512, out_bytes=4)
    bf16 = k2_bytes(256, 196, 49, 512, out_bytes=2)
    assert fp32 / 1e6 == pytest.approx(234.0, abs=0.5)
    assert bf16 / 1e6 == pytest.approx(130.0, abs=1.5)


# ---- lever 1: FP8 block linears through torchao ---------------------------------------------------------------

torchao = pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is not installed")


def _fp8_tiny(mode="rowwise", **kw):
    from fastmae.engine.fp8 import convert_fp8

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny", **kw)
    swapped, skipped = convert_fp8(model, mode, torch.device("cpu"))
    return model, swapped, skipped


def test_fp8_swaps_the_block_linears_only_and_says_why_the_rest_stay_bf16():
    from torchao.float8.float8_linear import Float8Linear

    model, swapped, skipped = _fp8_tiny()
    # Written from the architecture: 4 encoder + 2 decoder blocks, each with qkv, proj, fc1, fc2.
    expected = {f"{p}.{i}.{leaf}" for p, n in (("blocks", 4), ("decoder_blocks", 2)) for i in range(n)
                for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(swapped) == expected
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == expected
    assert set(skipped) == {"decoder_embed", "decoder_pred"} and all("kept bf16" in why for why in skipped.values())
    assert type(model.patch_embed.proj) is torch.nn.Conv2d and type(model.norm) is torch.nn.LayerNorm
    assert type(model.decoder_pred) is torch.nn.Linear


def test_fp8_skips_linears_the_scaled_gemm_cannot_take():
    from fastmae.engine.fp8 import fp8_plan

    # A decoder 120 wide: 120 is not a multiple of 16, so every decoder block linear stays bf16.
    swap, skip = fp8_plan(create_model("mae_vit_tiny", decoder_embed_dim=120, decoder_num_heads=4))
    assert all(n.startswith("blocks.") for n in swap) and len(swap) == 16
    assert "not a multiple of 16" in skip["decoder_blocks.0.attn.qkv"]


def test_fp8_checkpoint_loads_into_the_bf16_model_and_exports(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from fastmae.convert import hf_config_kwargs, save_timm_encoder, to_hf_vitmae

    model, _, _ = _fp8_tiny()
    sd = model.state_dict()
    plain = create_model("mae_vit_tiny")
    assert list(sd) == list(plain.state_dict())
    plain.load_state_dict(sd, strict=True)
    assert all(v.dtype == torch.float32 for v in sd.values())  # fp8 lives in the GEMMs only, never in the weights
    hf = ViTMAEForPreTraining(ViTMAEConfig(**hf_config_kwargs(plain), mask_ratio=0.75))
    hf.load_state_dict(to_hf_vitmae(sd), strict=True)
    save_timm_encoder(model, tmp_path / "enc.safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "enc.safetensors")["blocks.0.attn.qkv.weight"], plain.blocks[0].attn.qkv.weight)


@pytest.mark.slow  # minutes of Inductor compile on a loaded 2-core machine; run with -m slow
def test_fp8_forward_backward_compiles_in_one_graph_with_the_custom_ops():
    model, _, _ = _fp8_tiny("tensorwise")
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(imgs, noise=noise)[0]
        loss = compiled(imgs, noise=noise)[0]
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mlp.fc1.weight.grad is not None
    torch.testing.assert_close(loss.detach(), eager.detach(), rtol=2e-2, atol=0)


def test_fp8_loss_is_the_bf16_loss_within_fp8_rounding():
    model, _, _ = _fp8_tiny("rowwise")
    ref = create_model("mae_vit_tiny")
    ref.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(4, 3, 64, 64), torch.rand(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(imgs, noise=noise)[0], ref(imgs, noise=noise)[0]
    torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=0)
    assert not torch.equal(a, b)  # the GEMMs really ran in fp8


def test_fp8_bad_mode_and_missing_torchao_are_one_line_errors(monkeypatch):
    import builtins

    from fastmae.engine.fp8 import convert_fp8

    with pytest.raises(ValueError, match="fp8 must be off, tensorwise or rowwise"):
        convert_fp8(create_model("mae_vit_tiny"), "e4m3", torch.device("cpu"))
    real_import = builtins.__import__

    def no_torchao(name, *a, **kw):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ValueError, match=r"--fp8 needs torchao \(pip install '\.\[fp8\]'\)"):
        convert_fp8(create_model("mae_vit_tiny"), "rowwise", torch.device("cpu"))


# ---- lever 4: compile modes -----------------------------------------------------------------------------------


def _layout(**kw):
    from fastmae.engine.plan import resolve_layout

    base = dict(target_eff_batch=0, world_size=1, device_type="cuda", gpu_mem_gib=None, compile=True, cuda_graphs=True,
                batch_size=256, accum_iter=1)
    return resolve_layout(None, 0, **{**base, **kw})


def test_compile_mode_auto_keeps_the_graph_decision_and_explicit_modes_are_honoured():
    assert _layout().compile_mode == "reduce-overhead" and _layout().cuda_graphs
    assert _layout(accum_iter=2).compile_mode == "default"
    lay = _layout(compile_mode="max-autotune-no-cudagraphs")
    assert lay.compile_mode == "max-autotune-no-cudagraphs" and not lay.cuda_graphs and "max-autotune" in lay.reason
    assert _layout(compile_mode="default").compile_mode == "default" and not _layout(compile_mode="default").cuda_graphs
    cpu = _layout(device_type="cpu", compile_mode="reduce-overhead")
    assert cpu.compile_mode == "default" and not cpu.cuda_graphs  # no graphs off CUDA


@pytest.mark.parametrize("kw,match", [
    (dict(compile=False, compile_mode="default"), "needs --compile=true"),
    (dict(accum_iter=4, compile_mode="reduce-overhead"), "accum_iter=4"),
    (dict(cuda_graphs=False, compile_mode="reduce-overhead"), "CUDA graphs, which are off here"),
])
def test_compile_mode_contradictions_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _layout(**kw)


def test_compile_forward_passes_the_layout_mode_to_torch_compile(monkeypatch):
    from fastmae import pretrain
    from fastmae.config import parse_overrides

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    cfg = parse_overrides(["--compile=true", "--compile_mode=max-autotune-no-cudagraphs"])
    pretrain.compile_forward(torch.nn.Identity(), cfg, type("Info", (), {"enabled": False})(), "max-autotune-no-cudagraphs")
    assert seen == {"fullgraph": True, "mode": "max-autotune-no-cudagraphs"}
    pretrain.compile_forward(torch.nn.Identity(), cfg, type("Info", (), {"enabled": False})(), "default")
    assert seen["mode"] is None
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        parse_overrides(["--compile_mode=max-autotune"])


# ---- lever 5: attention kernels from a measured table -----------------------------------------------------------


def _table_file(tmp_path, shapes, name="attn.json"):
    import json

    from fastmae.layers.attention import TABLE_FORMAT

    path = tmp_path / name
    path.write_text(json.dumps({"format": TABLE_FORMAT, "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
                                "shapes": shapes}))
    return str(path)


H100_CAPS = dict(cuda=True, sm=90, sdpa_cudnn=True, sdpa_flash=True, sdpa_efficient=True)


def test_measured_table_overrides_the_rules_for_its_shapes_only(tmp_path):
    from fastmae.layers.attention import AttnCaps, choose_attention_backend, load_attention_table

    caps = AttnCaps(**H100_CAPS)
    path = _table_file(tmp_path, [
        {"head_dim": 32, "tokens": 197, "batch": 256, "fwd_bwd_ms": {"sdpa_cudnn": 0.9, "sdpa_efficient": 0.5}},
        {"head_dim": 64, "tokens": 50, "batch": 256, "fwd_bwd_ms": {"flash_attn_2": 0.1, "sdpa_flash": 0.3}},
    ])
    table = load_attention_table(path)
    rule = choose_attention_backend(32, 197, torch.bfloat16, "cuda", caps, "auto")
    assert rule == "sdpa_cudnn"
    assert choose_attention_backend(32, 197, torch.bfloat16, "cuda", caps, "auto", table) == "sdpa_efficient"
    # flash-attn measured fastest but not installed here: the rules decide.
    assert choose_attention_backend(64, 50, torch.bfloat16, "cuda", caps, "auto", table) == "sdpa_cudnn"
    assert choose_attention_backend(64, 197, torch.bfloat16, "cuda", caps, "auto", table) == "sdpa_cudnn"  # not measured
    assert choose_attention_backend(32, 197, torch.bfloat16, "cpu", caps, "auto", table) == "sdpa"
    assert choose_attention_backend(32, 197, torch.bfloat16, "cuda", caps, "eager", table) == "eager"


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a readable JSON file"),
    ('{"shapes": []}', "not a fastmae-attention-table/1 file"),
    ('{"format": "fastmae-attention-table/1", "shapes": [{"head_dim": 32}]}', "shape 0 needs head_dim, tokens"),
    ('{"format": "fastmae-attention-table/1", "shapes": [{"head_dim": 32, "tokens": 197, "batch": 8, '
     '"fwd_bwd_ms": {"warp_speed": 1.0}}]}', "unknown kernels"),
    ('{"format": "fastmae-attention-table/1", "shapes": [{"head_dim": 32, "tokens": 197, "batch": 8, '
     '"fwd_bwd_ms": {"sdpa": -1}}]}', "non-positive"),
])
def test_bad_attention_table_is_a_one_line_error_before_any_work(tmp_path, content, match):
    from fastmae.config import parse_overrides

    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        parse_overrides([f"--attention_table={path}"])
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(ValueError, match="not a readable JSON file"):
        parse_overrides([f"--attention_table={tmp_path / 'missing.json'}"])


def test_the_run_folder_records_the_attention_choice_and_its_source(tmp_path):
    import json

    from fastmae import pretrain
    from fastmae.config import parse_overrides
    from fastmae.layers.attention import AttnCaps, set_attention_capabilities, set_attention_table

    path = _table_file(tmp_path, [{"head_dim": 32, "tokens": 65, "batch": 8, "fwd_bwd_ms": {"sdpa_efficient": 0.2,
                                                                                         "sdpa_flash": 0.4}}])
    cfg = parse_overrides([f"--attention_table={path}"])
    set_attention_capabilities(AttnCaps(**H100_CAPS))
    set_attention_table(pretrain.load_attention_table(cfg.step.attention_table))
    try:
        text = pretrain.attention_kernels(cfg, torch.bfloat16, torch.device("cuda"), tmp_path / "attention.json")
    finally:
        set_attention_capabilities(None)
        set_attention_table(None)
    rec = json.loads((tmp_path / "attention.json").read_text())["shapes"]
    assert rec["decoder"] == {"head_dim": 32, "tokens": 65, "kernel": "sdpa_efficient", "source": f"table {path}"}
    assert rec["encoder"]["source"] == "rules" and rec["encoder"]["kernel"] == "sdpa_cudnn"
    assert "decoder 32-dim x 65 tokens: sdpa_efficient" in text


def test_the_gpu_reports_attention_rows_become_the_choosers_table(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_report

    from fastmae.layers.attention import AttnCaps, choose_attention_backend, load_attention_table

    # Rows as section_attention writes them, a refused kernel (error, no timing) included.
    rows = [dict(model="ViT-B/16", part="decoder", batch=256, heads=16, head_dim=32, tokens=197, kernel=k, **t)
            for k, t in (("sdpa_cudnn", {"fwd_bwd_ms": 1.2}), ("sdpa_efficient", {"fwd_bwd_ms": 0.8}),
                         ("flash_attn_3", {"error": "head_dim 32 unsupported"}))]
    path = gpu_report.write_attention_table(rows, tmp_path / "attention_table.json", "NVIDIA H100 80GB HBM3", torch.bfloat16)
    table = load_attention_table(str(path))
    assert table == {(32, 197): ("sdpa_efficient", 0.8, 256)}
    assert choose_attention_backend(32, 197, torch.bfloat16, "cuda", AttnCaps(**H100_CAPS), "auto", table) == "sdpa_efficient"


# ---- lever 6: fewer elementwise passes in a block ---------------------------------------------------------------


def test_packed_qkv_gradient_arrives_in_qkv_layout_without_a_permuted_copy():
    from fastmae.layers.attention import AttnCaps, run_attention

    B, T, H, Dh = 2, 7, 4, 8
    x = torch.randn(B, T, 3, H, Dh, requires_grad=True)
    qkv = x * 1.0  # a non-leaf: its hook sees the gradient exactly as autograd hands it over
    seen = []
    qkv.register_hook(lambda g: seen.append(g))
    out = run_attention(qkv, "sdpa", Dh**-0.5, AttnCaps())
    out.square().sum().backward()
    # Stacked straight into (B, T, 3, H, Dh): a permuted stack would need one more full copy before the qkv GEMM.
    assert seen[0].is_contiguous()
    q, k, v = x.detach().permute(2, 0, 3, 1, 4)  # the eager formula, independent of the code under test
    ref = (((q * Dh**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * Dh)
    torch.testing.assert_close(out.detach(), ref)


# ---- the plan: one step estimate per lever ------------------------------------------------------------------------

# The official fp32 residual pinned: the lever rows below are counted from it (auto would pick bf16 for CUDA).
PLAN_B256 = ["--preset=base", "--device=cuda", "--gpu=h100", "--eff_batch=0", "--batch_size=256", "--accum_iter=1",
             "--residual_dtype=fp32"]


def test_residual_dtype_auto_is_bf16_on_cuda_and_fp32_elsewhere(tmp_path):
    """The A/B's decision (bench/RESULTS.md, "Compute levers"): resolved at parse time, so the run folder records it."""
    from fastmae.config import parse_overrides

    assert parse_overrides(["--device=cuda"]).step.residual_dtype == "bf16"
    assert parse_overrides(["--device=cuda:1", "--residual_dtype=auto"]).step.residual_dtype == "bf16"
    assert parse_overrides(["--device=cpu"]).step.residual_dtype == "fp32"
    assert parse_overrides(["--device=cuda", "--residual_dtype=fp32"]).step.residual_dtype == "fp32"
    cfg = parse_overrides(["--device=cuda", f"--output_dir={tmp_path}"])
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["step"]["residual_dtype"] == "bf16"
    plan = parse_overrides(["--preset=base", "--device=cuda", "--gpu=h100", "--dry_run"])
    assert plan.step.residual_dtype == "bf16" and plan.step.decoder_input_dtype == "auto"


def _lever_rows(*extra):
    from fastmae.config import parse_overrides
    from fastmae.engine import levers
    from fastmae.engine import plan as planmod

    cfg = parse_overrides([*PLAN_B256, *extra])
    model = planmod.build_meta_model(cfg.model.name, cfg.data.img_size)
    shape = planmod.model_shape(model, cfg.data.img_size, cfg.model.mask_ratio)
    fwd = planmod.mae_forward_flops(model, cfg.data.img_size, cfg.model.mask_ratio)
    lay = planmod.layout_for(cfg)
    est = planmod.estimate_step(shape, 0, fwd, lay, planmod.GPUS[cfg.plan.gpu], cfg.step.compile, cfg.step.residual_dtype)
    return {r.name: r for r in levers.lever_rows(cfg, shape, fwd, lay, planmod.GPUS[cfg.plan.gpu], est)}, est


def test_plan_prints_a_row_per_lever_and_fp8_counts_when_on(capsys):
    from fastmae.plan import main as plan_command

    assert plan_command(PLAN_B256 + ["--fp8=rowwise"]) == 0
    out = capsys.readouterr().out
    for name in ("as planned", "fp8=rowwise", "decoder_input_dtype=autocast", "residual_dtype=bf16",
                 "compile_mode=max-autotune-no-cudagraphs", "attention_table", "fewer elementwise passes",
                 "all levers that help"):
        assert name in out
    off, est = _lever_rows()
    on, _ = _lever_rows("--fp8=rowwise")
    assert on["as planned"].step_ms == pytest.approx(off["fp8=rowwise"].step_ms)
    assert off["as planned"].step_ms != pytest.approx(on["as planned"].step_ms)


def test_the_plans_range_counts_the_levers_a_run_turns_on():
    """The step estimate and its range (not only the lever table) price FP8 GEMMs and the other levers when on."""
    from fastmae.config import parse_overrides
    from fastmae.engine.plan import build_plan

    off = build_plan(parse_overrides(PLAN_B256))
    rows_off, _ = _lever_rows()
    for flag in ("--fp8=rowwise", "--decoder_input_dtype=autocast", "--compile_mode=max-autotune-no-cudagraphs"):
        on = build_plan(parse_overrides([*PLAN_B256, flag]))
        rows, _ = _lever_rows(flag)
        lever = flag[2:]
        delta = rows["as planned"].step_ms - rows_off["as planned"].step_ms
        assert delta != 0, flag
        assert on.estimate.step_ms - off.estimate.step_ms == pytest.approx(delta), flag
        assert on.estimate.levers_ms - off.estimate.levers_ms == pytest.approx(delta), flag
        assert rows[lever].note.startswith("on") or "K2" in rows[lever].note, flag
        for lo_on, lo_off in zip(on.span, off.span, strict=True):  # both ends of the printed range move with it
            assert (lo_on.step_ms - lo_off.step_ms) * delta > 0, flag


def test_lever_rows_count_k2_and_the_decoder_stream_and_skip_what_does_not_apply():
    from fastmae.engine import levers
    from fastmae.engine import plan as planmod

    rows, est = _lever_rows()
    gpu = planmod.GPUS["h100"]
    bw = gpu.hbm_tbs * 1e12 * planmod.BW_EFF
    k2 = (levers.k2_bytes(256, 196, 49, 512, 4) - levers.k2_bytes(256, 196, 49, 512, 2)) / bw * 1e3
    # The plan counts K2 at bf16: today's fp32 decoder input adds its bytes back in the "as planned" row.
    assert rows["as planned"].step_ms == pytest.approx(est.step_ms + k2)
    dec_tc = 8 * 197 * 512 * 256
    dec_stream = planmod.BF16_RESIDUAL_SAVING * planmod.COMPILE_ELEMENTWISE_FACTOR * dec_tc / bw * 1e3
    assert rows["as planned"].step_ms - rows["decoder_input_dtype=autocast"].step_ms == pytest.approx(k2 + dec_stream)
    a100, _ = _lever_rows("--gpu=a100")
    assert a100["fp8=rowwise"].step_ms != a100["fp8=rowwise"].step_ms  # NaN: no FP8 tensor cores
    no_compile, _ = _lever_rows("--compile=false")
    assert "needs --compile" in no_compile["compile_mode=max-autotune-no-cudagraphs"].note
    helping = rows["all levers that help"]
    assert helping.step_ms < min(r.step_ms for n, r in rows.items() if n != "all levers that help")


def test_measured_attention_time_replaces_the_roofline_when_both_shapes_are_in_the_table():
    from fastmae.engine.levers import measured_attention_ms
    from fastmae.engine.plan import build_meta_model, model_shape

    shape = model_shape(build_meta_model("mae_vit_base_patch16", 224), 224, 0.75)
    table = {(64, 50): ("sdpa_cudnn", 0.2, 128), (32, 197): ("sdpa_efficient", 0.5, 128)}
    assert measured_attention_ms(shape, table, 256) == pytest.approx(12 * 0.4 + 8 * 1.0)
    assert measured_attention_ms(shape, {(64, 50): ("sdpa", 0.2, 128)}, 256) is None
