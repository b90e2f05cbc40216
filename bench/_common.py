"""Shared machinery of the kernel microbenchmarks (bench/bench_<kernel>.py).

On CUDA: ``triton.testing.do_bench`` (median, p20, p80) of the Triton kernel vs the eager
reference vs the ``torch.compile``d reference, for forward, backward and forward+backward,
with the effective bandwidth (ideal bytes / time) and its share of the peak.

On CPU: the kernels only run under the Triton interpreter, whose timings mean nothing.
Instead each case reports the bytes the fused kernel must move (ideal, counted analytically)
next to the bytes the eager reference moves (counted by tracing its aten ops: inputs read +
outputs written, views free), plus eager-vs-compiled reference CPU timings at a reduced batch.

Every run prints a markdown table and appends rows to ``bench/results/<bench>.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _harness import append_csv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastmae.flags import underscores

BENCH_DIR = Path(__file__).resolve().parent
CSV_FIELDS = [
    "timestamp", "bench", "device", "torch", "triton", "git_sha", "case", "impl", "pass", "batch",
    "median_ms", "p20_ms", "p80_ms", "ideal_MB", "moved_MB", "GBps", "pct_peak", "note",
]
# Peak DRAM bandwidth (GB/s) by device-name fragment, from the vendors' data sheets.
PEAK_GBPS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
             "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "RTX 4090": 1008.0}


@dataclass
class Case:
    """One benchmark shape. ``make(batch, device)`` returns the input dict; ``ref`` / ``fused`` map it to the
    output; ``grad_keys`` are the inputs that require grad; ``ideal_bytes(pass)`` is the fused kernel's traffic."""

    name: str
    make: Callable[[int, torch.device], dict]
    ref: Callable[[dict], torch.Tensor]
    fused: Callable[[dict], torch.Tensor]
    grad_keys: Sequence[str]
    ideal_bytes: Callable[[int, str], int]
    note: str = ""
    passes: Sequence[str] = field(default_factory=lambda: ("fwd", "bwd", "fwd+bwd"))


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--batch", type=int, default=256, help="batch of the GPU runs and of the byte counts")
    ap.add_argument("--cpu_batch", type=int, default=16, help="batch of the CPU eager-vs-compiled timings")
    ap.add_argument("--peak_gbps", type=float, default=None, help="peak bandwidth (default: by device name)")
    ap.add_argument("--no_csv", action="store_true", help="do not append to bench/results/")
    ap.add_argument("--no_compile", action="store_true", help="skip the torch.compile'd reference")
    return ap.parse_args(underscores(sys.argv[1:]))  # --img-size = --img_size, as in fastmae


def env_info() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "uncommitted"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} threads)"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "git_sha": sha}


def peak_gbps(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for frag, gbps in PEAK_GBPS.items():
        if frag in name:
            return gbps
    return None


# ---- bytes moved by the eager reference ----------------------------------------------------------------


class _ByteCounter(TorchDispatchMode):
    """Sums input bytes read and output bytes written over aten ops; ops whose outputs alias an input
    (views) move nothing."""

    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        r = sum(t.numel() * t.element_size() for t in ins)
        w = sum(t.numel() * t.element_size() for t in outs)
        self.read += r
        self.written += w
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + r + w
        return out


def eager_bytes(case: Case, batch: int, device: torch.device) -> dict[str, int]:
    """Bytes the eager reference moves per pass (traced at ``batch``)."""
    inputs = case.make(batch, device)
    result = {}
    with _ByteCounter() as c:
        with torch.no_grad():
            case.ref(inputs)
    result["fwd"] = c.read + c.written
    if case.grad_keys:
        out = case.ref(inputs)
        gout = torch.ones_like(out)
        with _ByteCounter() as c:
            torch.autograd.grad(out, [inputs[k] for k in case.grad_keys], gout)
        result["bwd"] = c.read + c.written
        result["fwd+bwd"] = result["fwd"] + result["bwd"]
    return result


# ---- timing ---------------------------------------------------------------------------------------------


def _pass_fn(fn: Callable[[dict], torch.Tensor], inputs: dict, grad_keys: Sequence[str], kind: str):
    leaves = [inputs[k] for k in grad_keys]
    if kind == "fwd":
        def run():
            with torch.no_grad():
                fn(inputs)
        return run
    if kind == "bwd":
        out = fn(inputs)
        gout = torch.ones_like(out)
        return lambda: torch.autograd.grad(out, leaves, gout, retain_graph=True)

    def run_both():
        out = fn(inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run_both


def time_cuda(run: Callable[[], object]) -> tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def time_cpu(run: Callable[[], object], min_runs: int = 5, budget_s: float = 3.0) -> tuple[float, float, float]:
    run()  # warm-up (and compile, for torch.compile)
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return statistics.median(times), q[1], q[7]


# ---- driver ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def run_bench(bench: str, cases: Sequence[Case], args: argparse.Namespace) -> list[dict]:
    # The "bwd" pass re-runs one backward with retain_graph=True, which compiled graphs with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    info = env_info()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak = peak_gbps(info["device"], args.peak_gbps) if cuda else None
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows: list[dict] = []
    print(f"## {bench}\n\n{info['device']} | torch {info['torch']} | triton {info['triton']} | git {info['git_sha']}\n")
    if not cuda:
        print("No GPU: the Triton kernels only run under the interpreter here, and interpreter timings mean "
              "nothing, so none are reported. Below: bytes each kernel must move (ideal) vs bytes the eager "
              f"reference moves at batch {args.batch}, and CPU timings of the reference, eager vs torch.compile, "
              f"at batch {args.cpu_batch}.\n")
    for case in cases:
        moved = eager_bytes(case, args.batch, torch.device("cpu") if not cuda else device)
        impls = {"eager": case.ref}
        if not args.no_compile:
            impls["compiled"] = torch.compile(case.ref)
        if cuda:
            # CUDA tensors take the Triton path of fastmae.ops unless FASTMAE_KERNELS says otherwise.
            from fastmae import ops

            if ops.kernel_backend(device) != "triton":
                raise SystemExit(f"fastmae.ops would not run the Triton kernels here (backend {ops.kernel_backend(device)})")
            impls = {"triton": case.fused, **impls}
        batch = args.batch if cuda else args.cpu_batch
        for kind in case.passes:
            if kind != "fwd" and not case.grad_keys:
                continue
            ideal = case.ideal_bytes(args.batch, kind)
            for impl, fn in impls.items():
                inputs = case.make(batch, device)
                run = _pass_fn(fn, inputs, case.grad_keys, kind)
                med, p20, p80 = time_cuda(run) if cuda else time_cpu(run)
                scaled_ideal = ideal * batch / args.batch
                gbps = scaled_ideal / (med * 1e-3) / 1e9
                rows.append({
                    "timestamp": stamp, "bench": bench, **info, "case": case.name, "impl": impl, "pass": kind,
                    "batch": batch, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                    "ideal_MB": ideal / 1e6, "moved_MB": moved.get(kind, 0) / 1e6,
                    "GBps": gbps if cuda else None, "pct_peak": (100 * gbps / peak) if (cuda and peak) else None,
                    "note": case.note,
                })
    _print_table(rows, cuda)
    if not args.no_csv:
        append_csv([{k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in rows])
    return rows


def _print_table(rows: list[dict], cuda: bool) -> None:
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["pass"]), {})[r["impl"]] = r
    if cuda:
        print("| case | pass | impl | median ms | p20 | p80 | GB/s (ideal bytes) | % peak | vs eager |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (case, kind), impls in by_case.items():
            eager = impls["eager"]["median_ms"]
            for impl, r in impls.items():
                print(f"| {case} | {kind} | {impl} | {_fmt(r['median_ms'])} | {_fmt(r['p20_ms'])} | "
                      f"{_fmt(r['p80_ms'])} | {_fmt(r['GBps'], 0)} | {_fmt(r['pct_peak'], 1)} | "
                      f"{eager / r['median_ms']:.2f}x |")
    else:
        print("| case | pass | ideal MB (fused kernel) | eager reference MB | eager / ideal | "
              "CPU eager ms | CPU compiled ms | compiled speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for (case, kind), impls in by_case.items():
            e = impls["eager"]
            c = impls.get("compiled")
            ratio = e["moved_MB"] / e["ideal_MB"] if e["ideal_MB"] else float("nan")
            print(f"| {case} | {kind} | {e['ideal_MB']:.1f} | {e['moved_MB']:.1f} | {ratio:.1f}x | "
                  f"{_fmt(e['median_ms'], 2)} | {_fmt(c and c['median_ms'], 2)} | "
                  f"{(e['median_ms'] / c['median_ms']) if c else float('nan'):.2f}x |")
    print()
