"""The kernel microbenchmarks (bench/bench_<op>.py, pytest-benchmark modules) keep running: every row, Triton
included (in the interpreter), at the tiny scale with timing disabled; and the ratio-table entry point on one
module. Timing itself is never asserted here (speed claims come from bench/ runs only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastmae import ops

ROOT = Path(__file__).resolve().parents[1]
# Found by convention: every registered op has bench/bench_<name>.py (tests/test_ops_dispatch.py holds it).
MODULES = [f"bench_{name}.py" for name in ops.OPS]


def _env() -> dict:
    # aot_eager: the compiled rows are traced by dynamo through fastmae.ops without Inductor's slow C++ build.
    # PYTEST_XDIST_WORKER would make pytest-benchmark in the child believe it runs under xdist and disable timing.
    parent = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return {**parent, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FASTMAE_BENCH_SCALE": "tiny",
            "FASTMAE_BENCH_TRITON": "1", "FASTMAE_BENCH_COMPILE_BACKEND": "aot_eager", "FASTMAE_BENCH_ROUNDS": "1"}


def test_every_kernel_bench_row_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *[f"bench/{m}" for m in MODULES], "--benchmark-disable", "-q", "-p",
         "no:cacheprovider", "-rs"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Only the backward rows of ops without a differentiable input are skipped: the Triton rows ran.
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("forward only" in line for line in skips), "\n".join(skips)


def test_ratio_table_entry_point():
    proc = subprocess.run(
        [sys.executable, "bench/bench_gather_queries.py", "-k", "fwd", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | pass | batch | backend | median ms | vs reference eager")
    backends = {line.split("|")[4].strip() for line in table[2:]}
    assert backends == {"reference", "reference-compiled", "triton"}
