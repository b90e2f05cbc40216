"""Issue 11: the random kill-and-resume campaign, at CI size (2 trials: one SIGKILL, one SIGTERM to the whole
process group with a DataLoader worker), must resume every trial to bit-identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _campaign(tmp_path, args: list[str], timeout: float) -> tuple[list[dict], str]:
    """Run the campaign at CI size (2 trials: one SIGKILL, one SIGTERM) and check what every target must hold."""
    rows_path = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fault_campaign.py"), "--trials=2", *args, f"--json={rows_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert [row["kind"] for row in rows] == ["SIGKILL", "SIGTERM"]
    assert all(row["resumed"] and row["identical"] for row in rows), rows
    assert rows[1]["exit"] == 0 and rows[1]["lost_steps"] == 0, rows[1]
    return rows, r.stdout


def test_fault_campaign_smoke(tmp_path, demo_dir):
    _, out = _campaign(tmp_path, ["--steps=6", "--ckpt_every=2", "--num_workers=1", f"--data={demo_dir}", "--seed=3"],
                       600)
    assert "| all | 2 |" in out


def test_fault_campaign_smoke_on_finetuning(tmp_path):
    """The same campaign on the evaluation loop (issue 24, section 2): kill fine-tuning, resume, same weights."""
    _campaign(tmp_path, ["--target=finetune", "--steps=10", "--ckpt_every=3", "--seed=1"], 900)
