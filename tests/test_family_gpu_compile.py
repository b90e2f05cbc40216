"""The family's kernel shapes compile for sm_90 (and sm_80) without spilling, on a machine without a GPU.

VideoMAE feeds K1 and K3 images of t*C = 6 channels (P = 16*16*6 = 1536 for 2x16x16 tubelets) and a
masked-only prediction; SimMIM uses K1 on every patch and K3's L1 mode on raw pixels with a full
prediction. These constexpr combinations are outside the image report's CI subset, so they are
compiled here with ``tools/kernel_compile_report.compile_one`` (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``) in a subprocess, where the Triton interpreter is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tools")
import kernel_compile_report as R

specs = []
for C, p in ((6, 16), (6, 8)):  # VideoMAE 2x16x16 (ViT-B) and 2x8x8 (tiny) tubelets as paired frames
    specs.append(R.k1_fwd_job(C, p, "u8", "bf16", label="videomae "))
# K3: (C, p, img, pred, NORM_PIX, L1, PRED_FULL): VideoMAE tubelet/none targets on masked-only rows; SimMIM L1.
for C, p, img, pred, norm_pix, l1, full, name in (
    (6, 16, "u8", "bf16", True, False, False, "videomae tubelet-norm "),
    (6, 16, "fp32", "fp32", False, False, False, "videomae raw "),
    (3, 16, "u8", "bf16", False, True, True, "simmim l1 "),
    (3, 16, "fp32", "fp32", False, True, True, "simmim l1 fp32 "),
):
    for kind in ("fwd", "bwd"):
        specs.append(R.k3_job(kind, C, p, img, pred, norm_pix, l1, full, label=name))
rows = [R.compile_one(j) for j in R.as_jobs(specs, [80, 90])]
json.dump(rows, open(sys.argv[1], "w"))
"""


def test_family_kernel_shapes_compile_for_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 20
    for r in rows:
        assert r["error"] is None, f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['error']}"
        assert not r["spills"] and r["local"] == 0 and r["stack"] == 0, f"spill in {r}"
        assert 0 < r["regs"] <= 255
