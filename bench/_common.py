"""Shared machinery of the kernel microbenchmarks (bench/bench_<op>.py), which are pytest-benchmark modules.

Each op of ``fastmae.ops.OPS`` has one: ``cases(scale_name)`` gives its shapes as :class:`Case` objects,
``test_<op> = bench_test(CASES)`` is its pytest-benchmark test (timed by pytest-benchmark, which saves and
compares runs), and ``bench/gpu_report.py`` times the same cases through ``bench/_harness.py``.

Every benchmark calls the op through ``fastmae.ops`` with the backend forced
(``FASTMAE_KERNELS``), so what is timed is what trains:

- ``reference``: the eager twin (``fastmae.reference``), i.e. ``FASTMAE_KERNELS=torch``;
- ``reference-compiled``: the same under ``torch.compile``;
- ``triton``: the custom op and its registered backward, ``FASTMAE_KERNELS=triton``.

Each is measured for the forward (``fwd``, under ``no_grad``) and the backward alone
(``bwd``: the forward runs outside the timed region, the backward with ``retain_graph``).
``extra_info`` records the bytes the fused kernel must move (``ideal_MB``, counted
analytically) and, on reference rows, the bytes the eager reference moves (``moved_MB``,
counted by tracing its aten ops: inputs read + outputs written, views free).

Environment:

- ``FASTMAE_BENCH_SCALE``: ``cpu`` (default: ViT shapes at batch 8), ``gpu`` (batch 256, the
  real training shapes) or ``tiny`` (small images at batch 1: a smoke run that keeps the modules
  working, used by tests/test_kernel_benches.py); ``FASTMAE_BENCH_BATCH`` overrides the batch;
- ``FASTMAE_BENCH_TRITON=1``: run the Triton rows without CUDA, in the Triton interpreter
  (correctness only: interpreter timings mean nothing). Triton reads ``TRITON_INTERPRET`` when it is
  imported, which importing fastmae does, so this module sets it on import when asked;
- ``FASTMAE_BENCH_COMPILE_BACKEND``: ``torch.compile`` backend of the compiled rows (default
  ``inductor``; the smoke test uses ``aot_eager`` to skip Inductor's C++ build);
- ``FASTMAE_BENCH_ROUNDS``: timed rounds per benchmark (default 5, after one warm-up round).

Commands (pytest-benchmark saves and compares runs under ``.benchmarks/``):

    python -m pytest bench/bench_patchify_gather.py --benchmark-only -q
    python -m pytest bench/bench_*.py --benchmark-only --benchmark-autosave
    python -m pytest bench/bench_*.py --benchmark-only --benchmark-compare
    python bench/bench_patchify_gather.py            # the same, then a ratio table (bench/RESULTS.md "Kernels" keeps the summary)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("FASTMAE_BENCH_TRITON") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402 - after the interpreter switch above
from _harness import sync  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

BACKENDS = ("reference", "reference-compiled", "triton")
PASSES = ("fwd", "bwd")
BATCH = {"cpu": 8, "gpu": 256, "tiny": 1}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def scale() -> str:
    value = os.environ.get("FASTMAE_BENCH_SCALE", "cpu")
    if value not in BATCH:
        raise ValueError(f"FASTMAE_BENCH_SCALE must be one of {tuple(BATCH)}, got {value!r}")
    return value


def batch_size() -> int:
    return int(os.environ.get("FASTMAE_BENCH_BATCH", BATCH[scale()]))


def image_size(patch: int, scale_name: str | None = None) -> int:
    """224 px (the ViT recipes), or 2 x 2 patches at the tiny scale: the patch dim P stays the real one."""
    return 2 * patch if (scale_name or scale()) == "tiny" else 224


def element_bytes(src: str | torch.dtype) -> int:
    """Bytes of one element of ``src`` ('uint8', a float dtype's name, or a dtype)."""
    return 1 if src == "uint8" else torch.finfo(getattr(torch, src) if isinstance(src, str) else src).bits // 8


def bench_images(src: str, batch: int, size: int, device: torch.device, requires_grad: bool = False) -> tuple:
    """(imgs, mean, std): uint8 NHWC as the loaders deliver them with ImageNet's mean/std (C,), or float NCHW of
    dtype ``src`` without them."""
    if src == "uint8":
        imgs = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        return imgs, torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    imgs = torch.randn(batch, 3, size, size, device=device, dtype=getattr(torch, src), requires_grad=requires_grad)
    return imgs, None, None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_skip_reason() -> str | None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("no CUDA: the Triton rows would run in the Triton interpreter (correctness only, timings meaningless); "
            "set FASTMAE_BENCH_TRITON=1 to run them anyway")


def backend_params() -> list:
    """The backend axis of every benchmark; the Triton rows carry a skip mark without CUDA (reason included)."""
    import pytest

    reason = _triton_skip_reason()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return [pytest.param(b, marks=marks if b == "triton" else []) for b in BACKENDS]


@dataclass
class Case:
    """One benchmark shape. ``make(batch, device)`` returns the inputs; ``op(inputs)`` calls the op through
    ``fastmae.ops``; ``grad_keys`` are the inputs that require grad; ``ideal_bytes(batch, pass)`` is the traffic
    the fused kernel must have."""

    name: str
    make: Callable[[int, torch.device], dict]
    op: Callable[[dict], torch.Tensor]
    grad_keys: Sequence[str]
    ideal_bytes: Callable[[int, str], int]
    note: str = ""


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Force ``fastmae.ops`` to 'torch' or 'triton' inside the block."""
    from fastmae import ops

    with ops.use_kernel_backend(name):
        yield


class _ByteCounter(TorchDispatchMode):
    """Sums input bytes read and output bytes written over aten ops; ops whose outputs alias an input move nothing."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def inputs_device(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


def _pass_fn(fn: Callable[[dict], torch.Tensor], inputs: dict, grad_keys: Sequence[str], kind: str) -> Callable:
    dev = inputs_device(inputs)
    if kind == "fwd":
        def run_fwd():
            with torch.no_grad():
                fn(inputs)
            sync(dev)
        return run_fwd
    leaves = [inputs[k] for k in grad_keys]
    out = fn(inputs)
    gout = torch.full_like(out, 0.5)  # not 1: the backward must really scale by the upstream gradient

    def run_bwd():
        torch.autograd.grad(out, leaves, gout, retain_graph=True)
        sync(dev)
    return run_bwd


def eager_bytes(case: Case, batch: int, dev: torch.device, kind: str) -> int:
    """Bytes the eager reference moves in one ``kind`` pass at ``batch``."""
    with forced_backend("torch"):
        inputs = case.make(batch, dev)
        if kind == "fwd":
            with _ByteCounter() as c, torch.no_grad():
                case.op(inputs)
            return c.bytes
        out = case.op(inputs)
        with _ByteCounter() as c:
            torch.autograd.grad(out, [inputs[k] for k in case.grad_keys], torch.full_like(out, 0.5))
        return c.bytes


def bench_op(benchmark, case: Case, kind: str, backend: str) -> None:
    """Time one (case, pass, backend) row through ``fastmae.ops`` with the backend forced."""
    import pytest

    if kind == "bwd" and not case.grad_keys:
        pytest.skip("no differentiable input (uint8 images): forward only")
    dev, batch = device(), batch_size()
    # The bwd pass re-runs one backward with retain_graph=True, which compiled graphs with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    benchmark.group = f"{case.name} {kind}"
    benchmark.extra_info.update(case=case.name, kind=kind, backend=backend, batch=batch, note=case.note,
                                ideal_MB=case.ideal_bytes(batch, kind) / 1e6)
    if backend == "reference" and not benchmark.disabled:
        benchmark.extra_info["moved_MB"] = eager_bytes(case, batch, dev, kind) / 1e6
    with forced_backend("triton" if backend == "triton" else "torch"):
        inputs = case.make(batch, dev)
        fn = case.op
        if backend == "reference-compiled":
            torch._dynamo.reset()
            fn = torch.compile(case.op, dynamic=False, backend=os.environ.get("FASTMAE_BENCH_COMPILE_BACKEND", "inductor"))
        run = _pass_fn(fn, inputs, case.grad_keys, kind)
        rounds = int(os.environ.get("FASTMAE_BENCH_ROUNDS", "5"))
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


def bench_test(cases: Sequence[Case]) -> Callable:
    """The pytest-benchmark test of an op's module (bind it to ``test_<op>``): every case x pass x backend."""
    import pytest

    @pytest.mark.parametrize("backend", backend_params())
    @pytest.mark.parametrize("kind", PASSES)
    @pytest.mark.parametrize("case", cases, ids=lambda c: c.name.replace(" ", "-").replace(",", ""))
    def test(benchmark, case, kind, backend):
        bench_op(benchmark, case, kind, backend)

    return test


def ratio_table(results: dict) -> str:
    """Markdown table of a ``--benchmark-json`` file: median per backend, speed vs the eager reference, bytes."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for b in results["benchmarks"]:
        info = b["extra_info"]
        rows.setdefault((info["case"], info["kind"]), {})[info["backend"]] = {**info, "median_ms": b["stats"]["median"] * 1e3}
    lines = ["| case | pass | batch | backend | median ms | vs reference eager | ideal MB (fused) | eager reference MB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for (case, kind), by_backend in rows.items():
        ref = by_backend.get("reference")
        moved = f"{ref['moved_MB']:.1f}" if ref and "moved_MB" in ref else "-"
        for backend in BACKENDS:
            if backend not in by_backend:
                continue
            r = by_backend[backend]
            ratio = f"{ref['median_ms'] / r['median_ms']:.2f}x" if ref else "-"
            lines.append(f"| {case} | {kind} | {r['batch']} | {backend} | {r['median_ms']:.3f} | {ratio} | "
                         f"{r['ideal_MB']:.1f} | {moved} |")
    return "\n".join(lines)


def main(module_file: str) -> int:
    """``python bench/bench_<op>.py [pytest args]``: run the module's benchmarks, then print the ratio table."""
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        code = pytest.main([module_file, "--benchmark-only", "-q", f"--benchmark-json={out}", *sys.argv[1:]])
        if out.exists():
            results = json.loads(out.read_text())
            if results["benchmarks"]:
                machine = results["machine_info"]
                print(f"\n{machine.get('cpu', {}).get('brand_raw', machine['machine'])} | "
                      f"torch {torch.__version__} | scale {scale()}\n")
                print(ratio_table(results))
    return int(code)
