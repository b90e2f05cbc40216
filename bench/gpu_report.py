"""One-command GPU report: environment, kernels, training step, profile, data loader, residual dtype.

    pip install --no-deps -e . && python bench/gpu_report.py     # one GPU, offline; sized for < 8 minutes on an H100 (unmeasured)
    python bench/gpu_report.py --quick                           # the same code at tiny sizes on CPU (CI)
    python bench/gpu_report.py --sections kernels,step           # a subset

Writes ``bench/results/gpu_report.md`` and ``gpu_report.json`` (``--out DIR``). Every speed is a ratio
against the reference measured in the same run: every op of ``fastmae.ops.OPS`` (at its bench/bench_<op>.py
cases) against its eager twin (``fastmae.reference``) and ``torch.compile`` of that twin; the training step against the eager
reference path (fastmae's model with the reference ops) and HF ``ViTMAEForPreTraining`` when
``transformers`` is installed. Optional parts that are missing (DALI, flash-attn, transformers) give
"not installed" rows. Timing: bench/_harness.py (CUDA events on a GPU, a wall-clock timer elsewhere;
median, p20, p80). Every step goes through :func:`_step_fn`, i.e. ``fastmae.engine.step.train_step``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from _harness import hf_vitmae_step, sync, time_ms

from fastmae import ops
from fastmae.engine.flops import gpu_spec, mae_forward_flops
from fastmae.engine.optim import build_adamw
from fastmae.engine.plan import build_meta_model, model_shape
from fastmae.layers.attention import (
    FA3_HEAD_DIMS,
    attention_backend,
    attention_capabilities,
    choose_attention_backend,
    describe_attention,
    run_attention,
)
from fastmae.models.mae import create_model

RESULTS = Path(__file__).resolve().parent / "results"
# In order of value for a short first slot on one GPU: what is learnt per second spent.
SECTIONS = ("env", "kernels", "attention", "step", "compiled", "graphs", "profile", "large", "data", "residual")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_DEADLINE_S = 420.0
# (estimate, cap) seconds per section. A section starts only when its estimate fits the time left before
# --deadline, and is stopped at min(cap, time left); the environment (estimate 0) always runs. Full sizes:
# guesses for an H100 (the report records each section's seconds, so the first GPU report corrects them);
# quick sizes: measured on 2 quiet CPU cores, capped for a loaded machine.
BUDGETS_FULL = {"env": (0, 30), "kernels": (75, 150), "attention": (20, 45), "step": (35, 75), "compiled": (75, 150),
                "graphs": (75, 150), "profile": (15, 40), "large": (40, 90), "data": (45, 90), "residual": (40, 90)}
BUDGETS_QUICK = {"env": (0, 60), "kernels": (20, 180), "attention": (2, 60), "step": (20, 180), "compiled": (25, 180),
                 "graphs": (25, 180), "profile": (5, 60), "large": (20, 180), "data": (15, 120), "residual": (20, 120)}


@dataclass(frozen=True)
class Sizes:
    """What one run measures: GPU sizes by default, tiny CPU sizes with --quick."""

    kernel_scale: str  # the shapes of each op's bench/bench_<op>.py cases (see bench/_common.py)
    kernel_batch: int
    base: tuple[str, str, int, int]  # (label, model, img_size, patch): the model every step mode runs
    large: tuple[str, str, int, int]  # the second model (eager and reference; compiled with --large-compiled)
    step_batch: int
    warmup: int
    repeats: int
    data_images: int
    data_batch: int
    residual_steps: int
    residual_batch: int
    compile_backend: str  # "inductor"; CI's --quick traces the same graphs with "aot_eager" (no C++ codegen)


GPU_SIZES = Sizes(
    kernel_scale="gpu",
    kernel_batch=256,
    base=("ViT-B/16", "mae_vit_base_patch16", 224, 16), large=("ViT-L/16", "mae_vit_large_patch16", 224, 16),
    step_batch=256, warmup=3, repeats=10, data_images=1024, data_batch=256, residual_steps=300, residual_batch=32,
    compile_backend="inductor",
)
QUICK_SIZES = Sizes(
    kernel_scale="tiny",
    kernel_batch=4,
    base=("tiny", "mae_vit_tiny", 64, 8), large=("small 32/16", "mae_vit_small_patch16", 32, 16),
    step_batch=4, warmup=1, repeats=3, data_images=32, data_batch=8, residual_steps=10, residual_batch=8,
    compile_backend="aot_eager",
)


# The figures of each section's rows: a contender that errors still carries every key (None) and its error text,
# so a reader (or a test) can tell a row that ran from one that failed without a KeyError.
KERNEL_FIGURES = ("fwd_ms", "fwd_p20", "fwd_p80", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_p20", "fwd_bwd_p80", "GBps",
                  "pct_peak_bw")
ATTENTION_FIGURES = ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_p20", "fwd_bwd_p80", "vs_fastest")
STEP_FIGURES = ("compile", "step_ms", "p20_ms", "p80_ms", "img_s", "mfu", "vs_reference", "peak_mem_gib")
DATA_FIGURES = ("decode", "img_s", "vs_torch")


def _error_text(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _every_key(rows: list[dict], figures: tuple[str, ...]) -> list[dict]:
    for r in rows:
        for k in (*figures, "error", "note"):
            r.setdefault(k, None)
    return rows


@contextlib.contextmanager
def kernel_backend(value: str):
    """Run fastmae's ops with ``FASTMAE_KERNELS=value`` ('torch' = the eager reference ops) inside the block."""
    with ops.use_kernel_backend(value):
        yield


def _version(module: str, dist: str | None = None) -> str:
    """The installed version of ``module``, read from its distribution's metadata when ``dist`` names it (no import:
    transformers alone takes seconds to import), else from the imported module."""
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
        if dist:
            return importlib.metadata.version(dist)
        return str(importlib.import_module(module).__version__)
    except (ImportError, ValueError):
        return "not installed"
    except Exception as e:  # a broken optional install must not stop the report
        return f"unusable ({type(e).__name__})"


# ---- sections ------------------------------------------------------------------------------------------------


def section_env(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton", "triton"),
           "dali": _version("nvidia.dali"), "flash_attn": _version("flash_attn", "flash-attn"),
           "flash_attn_3": "installed" if importlib.util.find_spec("flash_attn_interface") else "not installed",
           "transformers": _version("transformers", "transformers"), "cuda": str(torch.version.cuda),
           "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = gpu_spec(name)
        props = torch.cuda.get_device_properties(device)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
        env.update(gpu=name, driver=driver, sm=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   peak_tflops=spec.peak_tflops if spec else None, peak_tbs=spec.hbm_tbs if spec else None)
    else:
        env.update(gpu="none", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    env["kernels"] = ops.kernel_backend(device)
    env["attention_caps"] = {k: v for k, v in vars(attention_capabilities()).items()}
    return env


def op_cases(scale_name: str) -> dict[str, list]:
    """Each registered op's benchmark cases (``cases(scale)`` of its bench/bench_<op>.py), found by convention."""
    import importlib.util as iu

    found = {}
    for name in ops.OPS:
        spec = iu.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"bench_{name}.py"))
        module = iu.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = module.cases(scale_name)
    return found


def section_kernels(device: torch.device, sizes: Sizes, peak_tbs: float | None, compile_ref: bool,
                    rows: list[dict] | None = None) -> list[dict]:
    """Every registered op's cases: eager reference, compiled reference, fused. Rows are appended as they finish."""
    runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    rows = [] if rows is None else rows
    for name, cases in op_cases(sizes.kernel_scale).items():
        for case in cases:
            # The cases of a module share one code object: without a reset, the second case fails the first one's
            # guards and dynamo recompiles it with dynamic shapes (another kernel than the step's).
            torch._dynamo.reset()
            impls = {"eager reference": ("torch", case.op)}
            if compile_ref:
                impls["compiled reference"] = ("torch", torch.compile(case.op, fullgraph=True, dynamic=False,
                                                                      backend=sizes.compile_backend))
            if runnable:
                impls["fused (Triton)"] = ("triton", case.op)
            for impl, (backend, fn) in impls.items():
                rows.append(_kernel_row(name, case, impl, backend, fn, device, sizes, peak_tbs))
            if not runnable:
                rows.append(dict(op=name, kernel=case.name, impl="fused (Triton)", note="needs CUDA or TRITON_INTERPRET=1"))
    return _every_key(rows, KERNEL_FIGURES)


def _kernel_row(name: str, case, impl: str, backend: str, fn: Callable, device: torch.device, sizes: Sizes,
                peak_tbs: float | None) -> dict:
    interpreted = backend == "triton" and device.type != "cuda"
    row = dict(op=name, kernel=case.name, impl=impl, batch=sizes.kernel_batch)
    try:
        with kernel_backend(backend):  # the interpreter's time means nothing: one call checks the path
            row.update(_time_kernel(fn, case, device, replace(sizes, warmup=0, repeats=1) if interpreted else sizes))
        row["pct_peak_bw"] = row["GBps"] / (peak_tbs * 1e3) if peak_tbs else None
    except Exception as e:  # one implementation failing is a finding, not a lost section
        row["error"] = _error_text(e)
    if interpreted:
        row["note"] = "Triton interpreter: checks the code path, the time means nothing"
    return row


def _time_kernel(fn: Callable, case, device: torch.device, sizes: Sizes) -> dict:
    """fwd and, for ops with a differentiable input, fwd+bwd quantiles, and GB/s of the ideal traffic. The forward
    runs with autograd on, as in the training step (and one grad mode keeps the compiled reference to one graph)."""
    inputs = case.make(sizes.kernel_batch, device)
    f = time_ms(lambda: fn(inputs), device, sizes.warmup, sizes.repeats)
    row = dict(fwd_ms=f[0], fwd_p20=f[1], fwd_p80=f[2])
    moved = case.ideal_bytes(sizes.kernel_batch, "fwd")
    if case.grad_keys:
        leaves = [inputs[k] for k in case.grad_keys]

        def both():
            out = fn(inputs)
            torch.autograd.grad(out, leaves, torch.full_like(out, 0.5))

        b = time_ms(both, device, sizes.warmup, sizes.repeats)
        row.update(bwd_ms=max(b[0] - f[0], 0.0), fwd_bwd_ms=b[0], fwd_bwd_p20=b[1], fwd_bwd_p80=b[2])
        moved += case.ideal_bytes(sizes.kernel_batch, "bwd")
    row["GBps"] = moved / ((row.get("fwd_bwd_ms") or f[0]) * 1e-3) / 1e9
    return row


def _attention_candidates(device: torch.device, head_dim: int, dtype: torch.dtype) -> list[str]:
    caps = attention_capabilities()
    out = ["eager", "sdpa"]
    if device.type != "cuda":
        return out
    half = dtype in (torch.float16, torch.bfloat16)
    out += [k for k, ok in (("sdpa_cudnn", caps.sdpa_cudnn and half), ("sdpa_flash", caps.sdpa_flash and half),
                            ("sdpa_efficient", caps.sdpa_efficient),
                            ("flash_attn_2", caps.flash_attn_2 and half and head_dim % 8 == 0),
                            ("flash_attn_3", caps.flash_attn_3 and half and head_dim in FA3_HEAD_DIMS)) if ok]
    return out


def section_attention(device: torch.device, sizes: Sizes, amp_dtype: torch.dtype,
                      rows: list[dict] | None = None) -> list[dict]:
    """Every available attention kernel at the encoder and decoder shapes, fwd and fwd+bwd, next to the chooser's pick."""
    caps = attention_capabilities()
    rows = [] if rows is None else rows
    for label, name, img, p in (sizes.base, sizes.large):
        shape = model_shape(build_meta_model(name, img, p), img, 0.75)
        heads = {"encoder": shape.num_heads, "decoder": shape.decoder_num_heads}
        for part, (hd, T) in shape.attention_shapes().items():
            H, B = heads[part], sizes.step_batch
            chosen = choose_attention_backend(hd, T, amp_dtype, device.type, caps, attention_backend())
            qkv = torch.randn(B, T, 3, H, hd, device=device, dtype=amp_dtype, requires_grad=True)
            g = torch.ones(B, T, H * hd, device=device, dtype=amp_dtype)
            part_rows = []
            for kernel in _attention_candidates(device, hd, amp_dtype):
                row = dict(model=label, part=part, batch=B, heads=H, head_dim=hd, tokens=T, kernel=kernel,
                           chosen="yes" if kernel == chosen else "")
                try:
                    row.update(_time_attention(qkv, g, kernel, caps, device, sizes))
                except Exception as e:  # a kernel that refuses this shape is a finding, not a crash
                    row["error"] = _error_text(e)
                part_rows.append(row)
            timed = [r for r in part_rows if r.get("fwd_bwd_ms") is not None]
            if timed:
                best = min(r["fwd_bwd_ms"] for r in timed)
                for r in timed:
                    r["vs_fastest"] = r["fwd_bwd_ms"] / best
            rows += part_rows
    return _every_key(rows, ATTENTION_FIGURES)


def write_attention_table(rows: list[dict], path: Path, device: str, dtype: torch.dtype) -> Path:
    """The attention section's timings as the chooser's table (``--attention_table=PATH``): per (head_dim, tokens),
    the fwd+bwd milliseconds of every kernel that ran (errors left out)."""
    from fastmae.layers.attention import TABLE_FORMAT

    shapes: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r.get("fwd_bwd_ms") is None:
            continue
        entry = shapes.setdefault((r["head_dim"], r["tokens"]), {"head_dim": r["head_dim"], "tokens": r["tokens"],
                                                                 "batch": r["batch"], "heads": r["heads"], "fwd_bwd_ms": {}})
        entry["fwd_bwd_ms"][r["kernel"]] = r["fwd_bwd_ms"]
    doc = {"format": TABLE_FORMAT, "device": device, "dtype": str(dtype).removeprefix("torch."), "shapes": list(shapes.values())}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _time_attention(qkv: torch.Tensor, grad_out: torch.Tensor, kernel: str, caps, device: torch.device,
                    sizes: Sizes) -> dict:
    scale = qkv.shape[-1] ** -0.5
    fwd = time_ms(lambda: run_attention(qkv, kernel, scale, caps), device, sizes.warmup, sizes.repeats)
    both = time_ms(lambda: (run_attention(qkv, kernel, scale, caps).backward(grad_out), setattr(qkv, "grad", None)),
                    device, sizes.warmup, sizes.repeats)
    return dict(fwd_ms=fwd[0], fwd_bwd_ms=both[0], fwd_bwd_p20=both[1], fwd_bwd_p80=both[2])


def _step_fn(model: torch.nn.Module, forward: Callable, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
             amp_dtype: torch.dtype, mask_ratio: float = 0.75) -> torch.Tensor:
    """One optimizer step as the training loop runs it (``fastmae.engine.step.train_step``: autocast forward,
    backward, gradient norm, fused AdamW skipping non-finite steps on the device). Returns the loss, a device
    tensor (no host sync). The one place the report touches the engine's step."""
    from fastmae.engine.step import train_step

    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = train_step(forward, optimizer, params, lambda: imgs, mask_ratio=mask_ratio, amp_dtype=amp_dtype)
    return loss


STEP_MODES = {
    "step": ("reference (eager, reference ops)", "eager", "HF ViTMAE (eager)"),
    "compiled": ("compiled",),
    "graphs": ("compiled + CUDA graphs",),
    "large": ("reference (eager, reference ops)", "eager"),
}


def section_step(device: torch.device, sizes: Sizes, amp_dtype: torch.dtype, peak_tflops: float | None,
                 modes: tuple[str, ...] = STEP_MODES["step"], model: tuple[str, str, int, int] | None = None,
                 rows: list[dict] | None = None) -> list[dict]:
    """One row per step mode of one model (default: the base model's eager modes), appended as each finishes."""
    rows = [] if rows is None else rows
    label, name, img, p = model or sizes.base
    torch.manual_seed(0)
    base = create_model(name, img_size=img, patch_size=p, norm_pix_loss=True).to(device)
    flops_img = 3 * mae_forward_flops(base, img, 0.75)
    B = sizes.step_batch
    u8 = torch.randint(0, 256, (B, img, img, 3), dtype=torch.uint8, device=device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    f32 = (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std
    for mode in modes:
        row = dict(model=label, mode=mode, batch=B, dtype=str(amp_dtype).replace("torch.", ""))
        if mode.startswith("HF") and _version("transformers") == "not installed":
            rows.append(_every_key([{**row, "note": "not installed"}], STEP_FIGURES)[0])
            continue
        torch._dynamo.reset()  # each compiled mode compiles once, for its own model: no recompiles across modes
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = _mode_step(mode, name, img, p, base, device, sizes, amp_dtype, f32, u8, row)
            ctx = kernel_backend("torch") if mode.startswith("reference") else contextlib.nullcontext()
            with ctx:
                ms = time_ms(step, device, sizes.warmup, sizes.repeats)
            row.update(step_ms=ms[0], p20_ms=ms[1], p80_ms=ms[2], img_s=B / (ms[0] / 1e3))
            row["mfu"] = row["img_s"] * flops_img / peak_tflops / 1e12 if peak_tflops else None
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as e:  # one failing mode (e.g. out of memory) must not lose the report
            row["error"] = _error_text(e)
        rows.append(_every_key([row], STEP_FIGURES)[0])
        torch._dynamo.reset()
    return rows


def _mode_step(mode: str, name: str, img: int, p: int, base, device: torch.device, sizes: Sizes,
               amp_dtype: torch.dtype, f32: torch.Tensor, u8: torch.Tensor, row: dict) -> Callable[[], object]:
    """The closure one step mode times (a fresh copy of ``base`` each)."""
    model = create_model(name, img_size=img, patch_size=p, norm_pix_loss=True).to(device)
    model.load_state_dict(base.state_dict())
    if mode.startswith("HF"):
        return hf_vitmae_step(model, f32, amp_dtype=amp_dtype)
    opt = build_adamw(model, torch.tensor(1e-4, device=device), 0.05, (0.9, 0.95), device)
    forward = model
    graphs = "graphs" in mode
    if mode.startswith("compiled"):
        kw = {"mode": "reduce-overhead"} if graphs and sizes.compile_backend == "inductor" else {}
        forward = torch.compile(model, fullgraph=True, dynamic=False, backend=sizes.compile_backend, **kw)
        row["compile"] = sizes.compile_backend
    if graphs and device.type != "cuda":
        row["note"] = "no CUDA here: the same code path without graphs"
    graphs = graphs and device.type == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin")
    # The reference path gets what it takes (float NCHW); the kernels read DALI's uint8 NHWC.
    x = f32 if mode.startswith("reference") else u8

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return _step_fn(model, forward, opt, x, amp_dtype)

    return step


def step_ratios(report: dict) -> None:
    """``vs_reference`` of every step-family row: its img/s over its model's reference row (any section)."""
    rows = [r for sec in STEP_MODES for r in report.get(sec) or []]
    for r in rows:
        ref = next((q for q in rows if q["model"] == r["model"] and q["mode"].startswith("reference")
                    and q.get("img_s") is not None), None)
        r["vs_reference"] = r["img_s"] / ref["img_s"] if ref and r.get("img_s") is not None else None


PROFILE_CATEGORIES = (
    ("fused ops", tuple(ops.OPS)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_", "_fused_adamw")),
    ("GEMM", ("gemm", "cutlass", "xmma", "cublas", "mm", "addmm", "matmul", "linear", "nvjet")),
    ("norm+elementwise", ("layer_norm", "elementwise", "vectorized", "triton_", "gelu", "add", "mul", "copy", "to_copy",
                          "reduce", "native_layer", "fill", "cat", "gather", "index", "sum", "div", "sub")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in PROFILE_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def section_profile(device: torch.device, sizes: Sizes, amp_dtype: torch.dtype) -> dict:
    """Share of one training step's time per category (device time on CUDA, CPU self time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile

    label, name, img, p = sizes.base
    torch.manual_seed(0)
    model = create_model(name, img_size=img, patch_size=p, norm_pix_loss=True).to(device)
    opt = build_adamw(model, torch.tensor(1e-4, device=device), 0.05, (0.9, 0.95), device)
    imgs = torch.randint(0, 256, (sizes.step_batch, img, img, 3), dtype=torch.uint8, device=device)
    for _ in range(2):
        _step_fn(model, model, opt, imgs, amp_dtype)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _step_fn(model, model, opt, imgs, amp_dtype)
        sync(device)
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        if device.type == "cuda":  # kernels carry the self device time; host-side ops have none
            t = getattr(evt, "self_device_time_total", None)
            t = getattr(evt, "self_cuda_time_total", 0.0) if t is None else t
        else:
            t = evt.self_cpu_time_total
            if not evt.key.startswith("aten::") and not evt.key.startswith("fastmae::"):
                continue
        if t:
            totals[_category(evt.key)] = totals.get(_category(evt.key), 0.0) + t
    total = sum(totals.values()) or 1.0
    return {"model": label, "mode": "eager", "timer": "device" if device.type == "cuda" else "cpu self",
            "share": {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}


def _synthetic_photo(rng, h: int, w: int):
    """A photo-like uint8 (h, w, 3) image from numpy alone: smooth colour gradients, a few hard-edged shapes and
    sensor-like noise, so JPEG sizes and decode costs resemble a photo's (no scikit-image on a fresh GPU box)."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(0.5, 4.0, 3)
        img[..., c] = 128 + 80 * np.sin(a * xx / w * np.pi + ph) * np.cos(b * yy / h * np.pi)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 10, h // 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_jpegs(root: Path, n: int, size: int = 320) -> Path:
    """n JPEGs (q90, size x 3/4 size px) of synthetic photos in an ImageFolder layout (PIL and numpy only)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n if split == "train" else 2):
            out = root / split / f"c{i % 4}"
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_synthetic_photo(rng, size * 3 // 4, size)).save(out / f"{i:05d}.jpg", quality=90)
    return root


# The data section's loaders: (row name, build_loader keywords). DALI's two training-crop decodes decide the default
# of --dali_decode on the first GPU: "roi" decodes the crop window only (may bypass the hardware JPEG engines),
# "whole" the whole image through nvJPEG's hardware path, cropped in the GPU resize.
DATA_LOADERS = (("torch", {"loader": "torch"}), ("dali", {"loader": "dali", "dali_decode": "roi"}),
                ("dali_whole", {"loader": "dali", "dali_decode": "whole"}))


class _JpegEngineLoad:
    """NVML's hardware JPEG decoder (NVJPG) utilization, sampled in a thread while a loader is timed; a one-line
    reason instead when there is no GPU, no ``pynvml`` (``pip install nvidia-ml-py``) or no such counter."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self.reason = "hw decoder load: no GPU" if device.type != "cuda" else ""
        self._stop = threading.Event()
        self._thread = None
        if self.reason:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._read = pynvml.nvmlDeviceGetJpgUtilization
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read(self._handle)
        except ImportError:
            self.reason = "hw decoder load: pynvml not installed"
        except Exception as e:  # an NVML without the JPEG counter (older driver or GPU) or an NVML error
            self.reason = f"hw decoder load: unavailable ({_error_text(e)})"

    def __enter__(self):
        if not self.reason:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(float(self._read(self._handle)[0]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def note(self) -> str:
        if self.reason or not self.samples:
            return self.reason or "hw decoder load: no sample"
        return f"hw JPEG decoder busy {statistics.mean(self.samples):.0f}% mean, {max(self.samples):.0f}% peak (NVML)"


def _time_loader(root: Path, kw: dict, device: torch.device, sizes: Sizes, workers: int) -> dict:
    """img/s over two epochs after a warm-up epoch, and the hardware JPEG decoder's load meanwhile."""
    from fastmae.data import build_loader

    ld = build_loader(root, split="train", batch_size=sizes.data_batch, img_size=224, output="uint8",
                      num_workers=workers, device=str(device), **kw)
    ld.set_epoch(0)
    for _ in ld:  # warm-up epoch: worker start, DALI pipeline build
        pass
    with _JpegEngineLoad(device) as engine:
        t0, n = time.perf_counter(), 0
        for epoch in (1, 2):
            ld.set_epoch(epoch)
            for imgs, _ in ld:
                n += imgs.to(device, non_blocking=True).shape[0]
        sync(device)
    img_s = n / (time.perf_counter() - t0)
    if kw["loader"] != "dali":
        return dict(img_s=img_s, decode="cpu (PIL)")
    backend = "mixed (nvJPEG)" if getattr(ld, "device_id", None) is not None else "cpu"
    return dict(img_s=img_s, decode=f"{backend}, {kw['dali_decode']}", note=engine.note())


def section_data(device: torch.device, sizes: Sizes, workers: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastmae-gpu-report-") as tmp:
        root = _make_jpegs(Path(tmp), sizes.data_images)
        for name, kw in DATA_LOADERS:
            row = dict(loader=name, images=sizes.data_images, batch=sizes.data_batch, workers=workers)
            if kw["loader"] == "dali" and _version("nvidia.dali") == "not installed":
                rows.append({**row, "note": "not installed"})
                continue
            try:
                row.update(_time_loader(root, kw, device, sizes, workers))
            except Exception as e:  # an optional loader failing must not lose the report
                row["error"] = _error_text(e)
            rows.append(row)
    torch_row = next((r for r in rows if r["loader"] == "torch" and r.get("img_s") is not None), None)
    for r in rows:
        if torch_row and r.get("img_s") is not None:
            r["vs_torch"] = r["img_s"] / torch_row["img_s"]
    return _every_key(rows, DATA_FIGURES)


def residual_ab(device: torch.device, steps: int, amp_dtype: torch.dtype, batch: int = 32, seed: int = 0,
                demo_cache: str | None = None) -> list[dict]:
    """The tiny preset's loss after ``steps`` AdamW steps with an fp32 vs a bf16 residual stream, same seed and data.

    Data: the embedded demo set (real photos), 64 px, as ``python train.py`` trains on; lr is the tiny preset's
    (blr 1.5e-3 x 32/256) after a linear warm-up over the first tenth of the steps.
    """
    from fastmae.config import pretrain_presets
    from fastmae.data import build_loader, prepare_demo_dataset
    from fastmae.data.demo import sample_photos

    if len(sample_photos()) < 2:  # the demo set is cut from photos bundled with scikit-image / scikit-learn
        return [dict(residual_dtype=r, note="not installed (the demo set needs scikit-image or scikit-learn)")
                for r in ("fp32", "bf16")]
    tiny = pretrain_presets()["tiny"]
    cache = demo_cache or Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae")) / "demo"
    root = prepare_demo_dataset(cache)  # built once from photos in installed packages (as train.py does)
    rows = []
    for residual in ("fp32", "bf16"):
        torch.manual_seed(seed)
        model = create_model(tiny["model"], img_size=tiny["img_size"], patch_size=tiny["patch_size"], norm_pix_loss=True,
                             residual_dtype=residual).to(device)
        lr = torch.tensor(0.0, device=device)
        opt = build_adamw(model, lr, 0.05, (0.9, 0.95), device)
        ld = build_loader(root, split="train", batch_size=batch, img_size=tiny["img_size"], loader="torch",
                          output="float", num_workers=0, seed=seed, device=str(device))
        base_lr = tiny["blr"] * batch / 256
        losses, step, epoch = [], 0, 0
        t0 = time.perf_counter()
        while step < steps:
            ld.set_epoch(epoch)
            for imgs, _ in ld:
                lr.fill_(base_lr * min(1.0, (step + 1) / max(steps // 10, 1)))
                losses.append(_step_fn(model, model, opt, imgs.to(device), amp_dtype))
                step += 1
                if step == steps:
                    break
            epoch += 1
        tail = torch.stack(losses[-max(steps // 10, 1):]).mean().item()  # deliberate: one read at the end
        rows.append(dict(residual_dtype=residual, steps=steps, batch=batch, dtype=str(amp_dtype).replace("torch.", ""),
                         final_loss=tail, first_loss=losses[0].item(), seconds=time.perf_counter() - t0))
    rows[1]["delta_vs_fp32"] = rows[1]["final_loss"] - rows[0]["final_loss"]
    return rows


# ---- report --------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    out = [f"# fastmae GPU report ({report['mode']})", "", f"Command: `{report['command']}`", ""]
    if "env" in report:
        out += ["## Environment", "", _table([{"key": k, "value": v} for k, v in report["env"].items()], ["key", "value"]), ""]
        if "attention_choice" in report:
            out += [f"Attention kernels (bf16): {report['attention_choice']}", ""]
    if "kernels" in report:
        out += ["## Kernels: every registered op (fwd; fwd+bwd where it has a differentiable input)", "",
                _table(report["kernels"], ["op", "kernel", "impl", "batch", "fwd_ms", "fwd_p20", "fwd_p80", "bwd_ms",
                                           "fwd_bwd_ms", "GBps", "pct_peak_bw", "note", "error"]), ""]
    if "attention" in report:
        out += ["## Attention kernels per shape (fwd+bwd; `chosen` = what the model runs here)", "",
                _table(report["attention"], ["model", "part", "batch", "heads", "head_dim", "tokens", "kernel", "chosen",
                                             "fwd_ms", "fwd_bwd_ms", "fwd_bwd_p20", "fwd_bwd_p80", "vs_fastest", "note",
                                             "error"]), ""]
    step_rows = [r for sec in STEP_MODES for r in report.get(sec) or []]
    if step_rows:
        cols = ["model", "mode", "compile", "batch", "dtype", "step_ms", "p20_ms", "p80_ms", "img_s", "vs_reference", "mfu",
                "peak_mem_gib", "note", "error"]
        out += ["## Training step", "", _table(step_rows, cols), ""]
    if "profile" in report:
        prof = report["profile"]
        out += [f"## Profile of one {prof['model']} step ({prof['mode']}, {prof['timer']} time)", "",
                _table([{"category": k, "share": f"{v:.1%}"} for k, v in prof["share"].items()], ["category", "share"]), ""]
    if "data" in report:
        out += ["## Data loader (generated JPEGs, 224 px, uint8 output)", "",
                _table(report["data"], ["loader", "decode", "images", "batch", "workers", "img_s", "vs_torch", "note",
                                        "error"]), ""]
    if "residual" in report:
        out += ["## Residual stream dtype (tiny preset, demo data, same seed)", "",
                _table(report["residual"], ["residual_dtype", "dtype", "steps", "batch", "first_loss", "final_loss",
                                            "delta_vs_fp32", "seconds"]), ""]
    if report.get("errors"):
        out += ["## Sections that failed", ""] + [f"- {k}: {v}" for k, v in report["errors"].items()] + [""]
    if report.get("skipped"):
        out += ["## Sections skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()] + [""]
    if report.get("seconds"):
        out += ["Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(out)


class SectionTimeout(BaseException):
    """A section ran past its cap (raised by the interval timer in the main thread). Not an Exception: the
    sections catch Exception per row (one failing contender is a finding), and the cap must end the section."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise :class:`SectionTimeout` inside the block after ``seconds`` (main thread on POSIX; no cap elsewhere)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its {seconds:.0f} s cap")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_report(report: dict, out: Path) -> None:
    """JSON and markdown, each replaced atomically: a kill at any moment leaves the last complete pair."""
    out.mkdir(parents=True, exist_ok=True)
    step_ratios(report)
    for name, text in (("gpu_report.json", json.dumps(report, indent=2, default=str) + "\n"),
                       ("gpu_report.md", to_markdown(report) + "\n")):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)


ROW_FIGURES = {"kernels": KERNEL_FIGURES, "attention": ATTENTION_FIGURES, "step": STEP_FIGURES,
               "compiled": STEP_FIGURES, "graphs": STEP_FIGURES, "large": STEP_FIGURES, "data": DATA_FIGURES}


def run_sections(report: dict, runs: dict[str, Callable], budgets: dict[str, tuple[float, float]], deadline: float,
                 out: Path, t0: float) -> None:
    """Run ``runs`` in order, each capped, skipping those whose estimate no longer fits before ``deadline``;
    the report is rewritten after every section (finished, failed or skipped)."""
    for name, run in runs.items():
        estimate, cap = budgets[name]
        left = deadline - (time.monotonic() - t0)
        if estimate and estimate > left:
            report["skipped"][name] = f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left before --deadline {deadline:.0f}"
            print(f"gpu_report: {name} skipped ({report['skipped'][name]})", file=sys.stderr)
            write_report(report, out)
            continue
        rows: list[dict] = []
        start = time.monotonic()
        try:
            with time_cap(min(cap, left)):
                result = run(rows)
            report[name] = result
        except (Exception, SectionTimeout) as e:  # keep every other section's figures (and this one's finished rows)
            report["errors"][name] = _error_text(e)
            if rows:
                report[name] = _every_key(rows, ROW_FIGURES.get(name, ()))
        torch._dynamo.reset()
        report["seconds"][name] = time.monotonic() - start
        print(f"gpu_report: {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr)
        write_report(report, out)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (what CI runs)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                    help="seconds from the start of the report (after Python's imports): a section whose estimate "
                         "no longer fits is skipped (and listed), a running one is stopped")
    ap.add_argument("--out", default=str(RESULTS), help="directory for gpu_report.md and gpu_report.json")
    ap.add_argument("--device", default=None, help="default: cuda if present (cpu with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd kernel references")
    ap.add_argument("--large-compiled", action="store_true", help="also time the large model compiled (one more compile)")
    ap.add_argument("--residual-steps", type=int, default=None, help="steps of the residual-dtype A/B")
    ap.add_argument("--residual-batch", type=int, default=None, help="batch of the residual-dtype A/B")
    ap.add_argument("--workers", type=int, default=None, help="loader workers/threads (default: min(8, cores))")
    ap.add_argument("--demo-cache", default=None, help="where the demo set lives (default: $FASTMAE_CACHE/demo)")
    return ap.parse_args(argv)


def _env_section(report: dict, env: dict, device: torch.device, sizes: Sizes, amp: torch.dtype) -> dict:
    report["env"] = env
    _, name, img, p = sizes.base
    probe = build_meta_model(name, img, p)
    report["attention_choice"] = describe_attention(model_shape(probe, img, 0.75).attention_shapes(), amp, device.type)
    return env


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = _parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"fastmae: error: unknown sections {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastmae: error: --device=cuda but no GPU is visible (use --quick on CPU)", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    torch.set_flush_denormal(True)
    amp = torch.bfloat16
    report: dict = {"mode": "quick (CPU, tiny sizes)" if args.quick else "full", "device": str(device),
                    "command": " ".join(["python bench/gpu_report.py", *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "deadline_s": args.deadline,
                    "errors": {}, "skipped": {}, "seconds": {}}
    out = Path(args.out)
    for stale in out.glob(".gpu_report.*.tmp"):  # left by a run killed while it wrote
        stale.unlink(missing_ok=True)
    write_report(report, out)  # from the first second on, the files on disk are a complete (if empty) report
    env = section_env(device)
    spec = gpu_spec(env.get("gpu", ""))
    peak_tf, peak_tbs = (spec.peak_tflops, spec.hbm_tbs) if spec else (None, None)
    workers = args.workers or min(8, os.cpu_count() or 1)
    large_modes = STEP_MODES["large"] + (("compiled",) if args.large_compiled else ())
    runs = {
        "env": lambda rows: _env_section(report, env, device, sizes, amp),
        "kernels": lambda rows: section_kernels(device, sizes, peak_tbs, not args.no_compile, rows),
        "attention": lambda rows: section_attention(device, sizes, amp, rows),
        "step": lambda rows: section_step(device, sizes, amp, peak_tf, STEP_MODES["step"], rows=rows),
        "compiled": lambda rows: section_step(device, sizes, amp, peak_tf, STEP_MODES["compiled"], rows=rows),
        "graphs": lambda rows: section_step(device, sizes, amp, peak_tf, STEP_MODES["graphs"], rows=rows),
        "profile": lambda rows: section_profile(device, sizes, amp),
        "large": lambda rows: section_step(device, sizes, amp, peak_tf, large_modes, sizes.large, rows),
        "data": lambda rows: section_data(device, sizes, workers),
        "residual": lambda rows: residual_ab(device, args.residual_steps or sizes.residual_steps, amp,
                                             batch=args.residual_batch or sizes.residual_batch, demo_cache=args.demo_cache),
    }
    budgets = BUDGETS_QUICK if args.quick else BUDGETS_FULL
    run_sections(report, {k: v for k, v in runs.items() if k in sections}, budgets, args.deadline, out, t0)
    if isinstance(report.get("attention"), list):  # the measured table for --attention_table (issue 22)
        write_attention_table(report["attention"], out / "attention_table.json", env.get("gpu", str(device)), amp)
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
