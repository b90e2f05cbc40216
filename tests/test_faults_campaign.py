"""Issue 11: the random kill-and-resume campaign, at CI size (2 trials: one SIGKILL, one SIGTERM to the whole
process group with a DataLoader worker), must resume every trial to bit-identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_fault_campaign_smoke(tmp_path, demo_dir):
    rows_path = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fault_campaign.py"), "--trials=2", "--steps=6", "--ckpt_every=2",
           "--num_workers=1", f"--data={demo_dir}", f"--json={rows_path}", "--seed=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert [row["kind"] for row in rows] == ["SIGKILL", "SIGTERM"]
    assert all(row["resumed"] and row["identical"] for row in rows), rows
    assert rows[1]["exit"] == 0 and rows[1]["lost_steps"] == 0, rows[1]
    assert "| all | 2 |" in r.stdout


def test_fault_campaign_smoke_on_finetuning(tmp_path):
    """The same campaign on the evaluation loop (issue 24, section 2): kill fine-tuning, resume, same weights."""
    rows_path = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fault_campaign.py"), "--target=finetune", "--trials=2", "--steps=10",
           "--ckpt_every=3", f"--json={rows_path}", "--seed=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert [row["kind"] for row in rows] == ["SIGKILL", "SIGTERM"]
    assert all(row["resumed"] and row["identical"] for row in rows), rows
    assert rows[1]["exit"] == 0 and rows[1]["lost_steps"] == 0, rows[1]
