"""Every Triton kernel configuration compiles for sm_80 and sm_90 without spilling, on a machine without a GPU.

Runs ``tools/kernel_compile_report.py`` in a subprocess: the compile needs the real Triton
JIT, while the other kernel tests run the kernels under ``TRITON_INTERPRET=1`` in this
process. CI compiles a subset (every block size / num_warps choice once, every dtype and
flag combination at the ViT-B shape); ``-m slow`` runs the full cross product (~1,550
compilations, ~5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae import ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "kernel_compile_report.py"


def _run_report(subset: str, tmp_path: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--subset", subset, "--arch", "80", "90", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800,
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"compile report failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _check(rows: list[dict]) -> None:
    assert rows, "no configuration compiled"
    # Every registered op's forward and backward kernel compiled (the report finds the ops in fastmae.ops.OPS).
    assert {(r["op"], r["kernel"].split()[-1]) for r in rows} == {(name, k) for name in ops.OPS for k in ("fwd", "bwd")}
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["error"] is None, f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['error']}"
        assert not r["spills"] and r["local"] == 0 and r["stack"] == 0, f"spill in {r}"
        assert 0 < r["regs"] <= 255 and r["shared"] < 48 * 1024


def test_kernels_compile_for_sm80_sm90_ci_subset(tmp_path):
    rows = _run_report("ci", tmp_path)
    _check(rows)
    # Every block size a launcher can choose is covered, for each kernel and arch.
    k1 = {(r["arch"], r["block"]) for r in rows if r["kernel"] == "K1 patchify_gather fwd"}
    assert k1 == {(a, 2**i) for a in (80, 90) for i in range(4, 13)}


@pytest.mark.slow
def test_kernels_compile_for_sm80_sm90_full(tmp_path):
    _check(_run_report("full", tmp_path))
