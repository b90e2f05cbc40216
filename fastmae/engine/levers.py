"""The compute levers of issue 22 in the plan's roofline: one step estimate per lever, each with its assumption.

:func:`lever_rows` starts from the plan's estimate of a configuration (``estimate_step``) and re-counts the
parts a lever changes, alone and all together:

- ``fp8``: the encoder/decoder block linears (qkv, proj, fc1, fc2: ~97% of ViT-B's GEMM FLOPs) at the FP8
  tensor-core rate, plus torchao's dynamic-scaling casts (amax + cast of each GEMM input, per step);
- ``decoder_input_dtype=autocast``: K2 writes the (N, 197, 512) decoder input in bf16, and with an fp32 residual
  the decoder's residual stream follows its input (Block keeps the dtype it is handed);
- ``residual_dtype=bf16``: the plan's own bf16-residual saving (``BF16_RESIDUAL_SAVING``);
- ``compile_mode=max-autotune-no-cudagraphs``: Inductor's GEMM templates take the bias+GELU and residual-add
  epilogues (``EPILOGUE_BYTES_SAVED``);
- ``attention_table``: the attention time of the measured fastest kernel per shape instead of the roofline's;
- fewer elementwise passes: the bytes per block removed from the compiled graph (``FEWER_PASSES_BYTES_SAVED``).

Nothing here runs at import; every constant is an assumption printed with the table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

# FP8 (e4m3 forward, e5m2 gradients) tensor cores run at 2x the dense bf16 rate on sm_89/sm_90/sm_100; A100 has none.
FP8_PEAK_FACTOR = {"a100": 0.0, "a100_pcie": 0.0, "a100_40gb": 0.0}
FP8_PEAK_DEFAULT = 2.0
# Achieved FP8 GEMM speed-up over bf16 at ViT-B's shapes (K or N = 512/768/2048/3072, M = B x tokens): below the 2x
# peak ratio because these GEMMs are short; rowwise scaling costs more in the epilogue (unmeasured, assumed).
FP8_GEMM_SPEEDUP = {"tensorwise": 1.6, "rowwise": 1.45}
# torchao's dynamic casts per element of each GEMM input (forward) and output gradient (backward), compiled: the
# amax fuses into the producer, the cast reads bf16 and writes fp8 (3 B); the weight gradient needs the other axis:
# rowwise scales and casts again (3 B), tensorwise transposes the fp8 copy (2 B).
FP8_CAST_BYTES = {"tensorwise": 5.0, "rowwise": 6.0}
# max-autotune epilogues, per token-channel per block, fwd+bwd: GELU after fc1 (4x wide: write+read of the bf16
# pre-activation, 16 B fwd + 16 B bwd) and the residual adds after proj/fc2 (write+read of bf16 outputs, 8 B).
EPILOGUE_BYTES_SAVED = 40.0
# Bytes per token-channel per block removed by lever 6 (bench/profile_block.py): the packed-qkv gradient no longer takes
# a stack + permuted copy (read + write of the 3D-wide bf16 gradient: 12 B). The plan's elementwise model never
# counted that copy, so its estimate stands; the row shows what the old layout cost.
FEWER_PASSES_BYTES_SAVED = 12.0

LEVER_ASSUMPTIONS = (
    f"FP8 block GEMMs at {FP8_GEMM_SPEEDUP['tensorwise']}x (tensorwise) / {FP8_GEMM_SPEEDUP['rowwise']}x (rowwise) "
    f"the bf16 time (peak ratio {FP8_PEAK_DEFAULT}x; none on A100), + {FP8_CAST_BYTES['tensorwise']:.0f} / "
    f"{FP8_CAST_BYTES['rowwise']:.0f} B of casts per GEMM input and output-gradient element",
    f"max-autotune epilogues remove {EPILOGUE_BYTES_SAVED:.0f} B per token-channel per block (GELU, residual adds)",
    "bf16 decoder input: K2 counted at its dtype; with an fp32 residual the decoder's stream follows it",
)


def k2_bytes(batch: int, num_patches: int, num_visible: int, dim: int, out_bytes: int, x_bytes: int = 2,
             pos_bytes: int | None = None) -> float:
    """K2's ideal HBM traffic, forward + backward, at ``batch``: read the visible tokens, the position table (in the
    output's dtype unless given), the mask token and int64 ids; write the decoder input; backward reads its gradient
    and the ids and writes the visible tokens' and the mask token's gradients."""
    pos_bytes = out_bytes if pos_bytes is None else pos_bytes
    ids = batch * num_patches * 8
    x = batch * (1 + num_visible) * dim * x_bytes
    out = batch * (1 + num_patches) * dim * out_bytes
    fwd = x + (1 + num_patches) * dim * pos_bytes + dim * 4 + ids + out
    bwd = out + ids + x + dim * 4
    return float(fwd + bwd)


@dataclass(frozen=True)
class LeverRow:
    name: str  # the lever, as the run key that turns it on
    step_ms: float
    img_s: float
    mfu: float
    note: str


def _block_linear_flops(shape) -> float:
    """Forward FLOPs per image of the block linears (qkv, proj, fc1, fc2) of encoder and decoder."""
    per = lambda t, d: 2 * t * d * d * (4 + 2 * shape.mlp_ratio)  # noqa: E731
    return (shape.depth * per(1 + shape.num_visible, shape.embed_dim)
            + shape.decoder_depth * per(1 + shape.num_patches, shape.decoder_embed_dim))


def _block_linear_io(shape) -> float:
    """Elements per image that torchao casts: each block linear's input and its output (gradient)."""
    # inputs: qkv, proj, fc1 (d each), fc2 (mlp*d); output gradients: qkv (3d), proj (d), fc1 (mlp*d), fc2 (d)
    per = lambda t, d: t * d * (3 + 2 * shape.mlp_ratio + 5)  # noqa: E731
    return (shape.depth * per(1 + shape.num_visible, shape.embed_dim)
            + shape.decoder_depth * per(1 + shape.num_patches, shape.decoder_embed_dim))


def _token_channels(shape, decoder_only: bool = False) -> float:
    dec = shape.decoder_depth * (1 + shape.num_patches) * shape.decoder_embed_dim
    return dec if decoder_only else dec + shape.depth * (1 + shape.num_visible) * shape.embed_dim


def _fp8_ms(est, shape, fwd_flops: float, images: int, bw: float, gpu_key: str, mode: str) -> float | None:
    """Change of the step time with FP8 block linears (negative = faster), or None where FP8 has no tensor cores."""
    if FP8_PEAK_FACTOR.get(gpu_key, FP8_PEAK_DEFAULT) == 0.0:
        return None
    from fastmae.engine.plan import attention_flops_per_image

    share = _block_linear_flops(shape) / (fwd_flops - attention_flops_per_image(shape))
    saved = est.gemm_ms * share * (1 - 1 / FP8_GEMM_SPEEDUP[mode])
    casts = FP8_CAST_BYTES[mode] * _block_linear_io(shape) * images / bw * 1e3
    return casts - saved


def measured_attention_ms(shape, table: dict, images: int) -> float | None:
    """Attention time of one step from a measured table ({(head_dim, tokens): (kernel, fwd+bwd ms, batch)}) when both
    the encoder and decoder shapes are in it: per layer, the fastest kernel's time scaled to the step's images."""
    shapes = shape.attention_shapes()
    depth = {"encoder": shape.depth, "decoder": shape.decoder_depth}
    total = 0.0
    for part, key in shapes.items():
        if key not in table:
            return None
        _, ms, batch = table[key]
        total += depth[part] * ms * images / batch
    return total


@dataclass(frozen=True)
class _Lever:
    name: str
    delta_ms: float | None  # change of the step when turned on, from off; None: not available on this target
    on: bool  # this configuration turns it on
    counted: bool  # the plan's estimate_step already counts it
    note: str = ""


def _levers(cfg, shape, fwd_flops: float, images: int, gpu, est, attention_table: dict | None
            ) -> tuple[list[_Lever], float, float]:
    """Every lever with its step-time change; the decoder residual saving the bf16 decoder input and the bf16
    residual share (counted once when both are on); K2's fp32-output time the plan's ideal count leaves out."""
    from fastmae.engine import plan as p

    bw = gpu.hbm_tbs * 1e12 * p.BW_EFF
    per_tc_ms = _token_channels(shape) * images / bw * 1e3  # ms per byte per token-channel per block
    factor = p.COMPILE_ELEMENTWISE_FACTOR if cfg.step.compile else 1.0
    dec_in = getattr(cfg.step, "decoder_input_dtype", "auto")
    dec_on = dec_in == "autocast" or (dec_in == "auto" and cfg.step.residual_dtype == "bf16")
    L, V, Dd = shape.num_patches, shape.num_visible, shape.decoder_embed_dim
    k2 = (k2_bytes(images, L, V, Dd, 2) - k2_bytes(images, L, V, Dd, 4)) / bw * 1e3
    dec_res = -p.BF16_RESIDUAL_SAVING * factor * _token_channels(shape, True) * images / bw * 1e3
    fp8 = getattr(cfg.step, "fp8", "off")
    mode = fp8 if fp8 != "off" else "rowwise"
    fp8_ms = _fp8_ms(est, shape, fwd_flops, images, bw, gpu.key, mode)
    epi = getattr(cfg.step, "compile_mode", "auto") == "max-autotune-no-cudagraphs"
    att = measured_attention_ms(shape, attention_table, images) if attention_table else None
    levers = [
        _Lever(f"fp8={mode}", fp8_ms, fp8 != "off", False, "no FP8 tensor cores" if fp8_ms is None else ""),
        _Lever("decoder_input_dtype=autocast", k2 + (0.0 if cfg.step.residual_dtype == "bf16" else dec_res), dec_on, False,
               f"K2 {k2:+.2f} ms"),
        _Lever("residual_dtype=bf16", -p.BF16_RESIDUAL_SAVING * factor * per_tc_ms - (dec_res if dec_on else 0.0),
               cfg.step.residual_dtype == "bf16", True),
        _Lever("compile_mode=max-autotune-no-cudagraphs",
               -EPILOGUE_BYTES_SAVED * factor * per_tc_ms if cfg.step.compile else None,
               epi, False, "" if cfg.step.compile else "needs --compile"),
        _Lever("attention_table", (att - est.attention_ms) if att is not None else 0.0, att is not None, False,
               "measured per shape" if att is not None else "no table: the roofline's time"),
        _Lever("fewer elementwise passes", 0.0, True, True,
               f"in the code: {FEWER_PASSES_BYTES_SAVED * per_tc_ms:.2f} ms less than the old qkv-gradient copy"),
    ]
    return levers, dec_res, (0.0 if dec_on else -k2)


def _planned(levers: list[_Lever], k2_fp32: float) -> float:
    # The plan counts K2 at its ideal bf16 output: an fp32 decoder input adds its extra bytes back.
    return k2_fp32 + sum(lv.delta_ms for lv in levers if lv.on and not lv.counted and lv.delta_ms is not None)


def planned_ms(cfg, shape, fwd_flops: float, images: int, gpu, terms: dict[str, float],
               attention_table: dict | None = None) -> float:
    """The change the levers ``cfg`` turns on make to a step whose roofline terms are ``terms`` (``estimate_step``'s
    gemm_ms, attention_ms, ...): what the plan's estimate and range add to the terms it counts itself."""
    levers, _, k2_fp32 = _levers(cfg, shape, fwd_flops, images, gpu, SimpleNamespace(**terms), attention_table)
    return _planned(levers, k2_fp32)


def lever_rows(cfg, shape, fwd_flops: float, layout, gpu, est, attention_table: dict | None = None) -> list[LeverRow]:
    """The plan of ``cfg`` with the levers it turns on ("as planned": ``est`` as the plan printed it, its
    ``levers_ms`` included), then each lever it leaves off turned on alone, then all of them."""
    images = layout.batch_size * layout.accum_iter
    levers, dec_res, k2_fp32 = _levers(cfg, shape, fwd_flops, images, gpu, est, attention_table)
    planned = _planned(levers, k2_fp32)
    est = replace(est, step_ms=est.step_ms - est.levers_ms)  # the terms alone; each row adds its own levers
    rows = [_row("as planned", planned, est, images, fwd_flops, gpu, "")]
    for lv in levers:
        if lv.delta_ms is None:
            rows.append(LeverRow(lv.name, float("nan"), float("nan"), float("nan"), lv.note))
        else:
            rows.append(_row(lv.name, planned + (0.0 if lv.on else lv.delta_ms), est, images, fwd_flops, gpu,
                             lv.note if lv.on and lv.note else ("on" if lv.on else lv.note)))
    # Every lever left off that shortens the step on its own (a lever the model says is slower stays off).
    off = [lv for lv in levers if not lv.on and lv.delta_ms is not None and lv.delta_ms < 0]
    total = planned + sum(lv.delta_ms for lv in off)
    if {lv.name for lv in off} >= {"decoder_input_dtype=autocast", "residual_dtype=bf16"}:
        total -= dec_res  # the decoder's bf16 stream counted by both
    rows.append(_row("all levers that help", total, est, images, fwd_flops, gpu, ", ".join(lv.name for lv in off)))
    return rows


def _row(name: str, extra_ms: float, est, images: int, fwd_flops: float, gpu, note: str) -> LeverRow:
    step = est.step_ms + extra_ms
    img_s = images / (step / 1e3)  # compute-bound: the loader cap would hide every lever
    return LeverRow(name, step, img_s, img_s * 3 * fwd_flops / (gpu.peak_tflops * 1e12), note)


def format_lever_rows(rows: list[LeverRow]) -> list[str]:
    """The plan's lever lines: step, img/s and MFU per lever, and the speed-up against the plan with its own levers."""
    base = rows[0].step_ms
    out = ["levers            step estimate with each lever alone, then together (issue 22; compute-bound: no loader "
           "cap; MFU at the bf16 peak)"]
    for r in rows:
        if r.step_ms != r.step_ms:  # NaN: the lever does not apply to this target
            out.append(f"  {r.name:<40} n/a ({r.note})")
            continue
        out.append(f"  {r.name:<40} {r.step_ms:6.1f} ms {r.img_s:7,.0f} img/s {r.mfu:4.0%} MFU "
                   f"{(base / r.step_ms - 1):+6.1%}" + (f"  ({r.note})" if r.note else ""))
    return out
