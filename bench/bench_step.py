"""End-to-end training step (forward, backward, AdamW) across modes, against HF ViTMAE in the same process.

    python bench/bench_step.py                       # tiny ViT at 224/16, batch 8, CPU or CUDA
    python bench/bench_step.py --model mae_vit_base_patch16 --batch 64 --device cuda
    python bench/bench_step.py --modes eager_bf16 --levers decoder_input_dtype=autocast residual_dtype=bf16 fp8=rowwise
    python bench/bench_step.py --modes compiled_bf16 --levers compile_mode=max-autotune-no-cudagraphs

Every fastmae mode runs ``fastmae.engine.step.train_step``, the step of ``fastmae pretrain``.
Modes: eager fp32 (the reference path: eager ops), eager bf16 (autocast),
compiled fp32, compiled bf16 (torch.compile fullgraph; CUDA graphs on CUDA),
and HF ViTMAE fp32 with torch's default AdamW as the outside reference. ``--levers KEY=VALUE ...`` (issue 22) adds,
for the first listed fastmae mode, one contender per lever (a model keyword such as ``residual_dtype=bf16``, or
``fp8=tensorwise|rowwise``, or ``compile_mode=MODE`` on a compiled mode), timed in the same rounds; its "vs base"
column is the ratio against that mode.
Every contender runs the same weights and noise; rounds are interleaved and
medians taken after warm-up. Markdown table to stdout, rows to bench/results/<bench>.csv.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys

import torch
from _harness import append_csv, hf_vitmae_step, interleaved, make_train_step, median_ms, stamp

from fastmae.flags import underscores
from fastmae.models import create_model


def make_step(model, device, amp_dtype, compiled: bool, x, noise, compile_mode: str | None = None):
    fwd = model
    if compiled:
        mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
        fwd = torch.compile(model, fullgraph=True, mode=mode)
    return make_train_step(model, device, amp_dtype, functools.partial(fwd, noise=noise), x, 0.75)


def lever_step(args, base_mode: str, lever: str, device, x, noise):
    """The step of ``base_mode`` with one lever on: a model keyword, ``fp8=MODE`` (torchao's block linears) or
    ``compile_mode=MODE`` (torch.compile's mode; a compiled base mode only)."""
    key, _, value = lever.partition("=")
    torch.manual_seed(0)
    kind, prec = base_mode.split("_")
    if key == "compile_mode" and kind != "compiled":
        raise SystemExit(f"--levers compile_mode=... needs a compiled first mode, got {base_mode}")
    kw = {} if key in ("fp8", "compile_mode") else {key: value}
    model = create_model(args.model, img_size=args.img_size, patch_size=args.patch_size, norm_pix_loss=True, **kw).to(device)
    if key == "fp8":
        from fastmae.engine.fp8 import convert_fp8

        convert_fp8(model, value, device)
    amp = {"fp32": torch.float32, "bf16": torch.bfloat16}[prec]
    return make_step(model, device, amp, kind == "compiled", x, noise, value if key == "compile_mode" else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mae_vit_tiny")
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--patch_size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", nargs="+", default=["eager_fp32", "eager_bf16", "compiled_fp32", "compiled_bf16", "hf_fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--levers", nargs="*", default=[], help="KEY=VALUE contenders on the first mode (issue 22)")
    args = ap.parse_args(underscores(sys.argv[1:]))  # --img-size = --img_size, as in fastmae
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    base = create_model(args.model, img_size=args.img_size, patch_size=args.patch_size, norm_pix_loss=True).to(device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    noise = torch.rand(args.batch, base.patch_embed.num_patches, device=device)

    steps = {}
    base_mode = next((m for m in args.modes if m != "hf_fp32"), None)
    for lever in args.levers:
        steps[f"{base_mode}[{lever}]"] = lever_step(args, base_mode, lever, device, x, noise)
    for mode in args.modes:
        if mode == "hf_fp32":
            steps[mode] = hf_vitmae_step(base, x, noise)
            continue
        kind, prec = mode.split("_")
        amp = {"fp32": torch.float32, "bf16": torch.bfloat16}[prec]
        steps[mode] = make_step(copy.deepcopy(base), device, amp, kind == "compiled", x, noise)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = dict(sorted(steps.items(), key=lambda kv: "[" in kv[0]))  # the base mode first, its levers after
    times = interleaved(steps, device, args.warmup, args.repeats)
    ref = median_ms(times["hf_fp32"]) if "hf_fp32" in times else None
    base_ms = median_ms(times[base_mode]) if base_mode in times else None
    eager = median_ms(times["eager_fp32"]) if "eager_fp32" in times else None
    env = stamp(device)
    rows = []
    for mode, ts in times.items():
        ms = median_ms(ts)
        rows.append({"bench": "train_step", "model": args.model, "img_size": args.img_size, "batch": args.batch, "mode": mode,
                     "ms": round(ms, 1), "img_s": round(args.batch / ms * 1e3, 1),
                     "vs_hf": round(ref / ms, 3) if ref else "", "vs_eager_fp32": round(eager / ms, 3) if eager else "",
                     "vs_base": round(base_ms / ms, 3) if base_ms and "[" in mode else "", **env})
    shape = f"{args.model} {args.img_size}px/{args.patch_size}, batch {args.batch}"
    print(f"\ntraining step, {shape}, {env['device']}, torch {env['torch']}\n")
    print("| mode | ms/step | img/s | vs HF ViTMAE fp32 | vs fastmae eager fp32 | vs base (levers) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = lambda v: f"{v}x" if v != "" else "-"
        print(f"| {r['mode']} | {r['ms']} | {r['img_s']} | {ratio(r['vs_hf'])} | {ratio(r['vs_eager_fp32'])} | "
              f"{ratio(r['vs_base'])} |")
    if device.type == "cuda":
        print(f"\npeak memory (all modes): {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    append_csv(rows)


if __name__ == "__main__":
    main()
