"""Data wait in the training log: per window and per run, in metrics.jsonl and summary.json, with a warning."""

from __future__ import annotations

import io
import json
import sys
import time

from fastmae.engine.logger import DataWait, RunLogger


def _window(dw: DataWait, steps: int, work_s: float) -> float:
    for _ in range(steps):
        dw()
        time.sleep(work_s)
    return dw.close()


def test_fraction_is_time_in_next_over_window_wall_time():
    slow_loader = [False]
    dw = DataWait(lambda: time.sleep(0.06) if slow_loader[0] else None)
    first = _window(dw, 3, 0.02)  # a loader with batches ready: the step never waits
    slow_loader[0] = True
    slow = _window(dw, 3, 0.02)  # the loader takes 3x the step's own work
    assert first < 0.2, first
    assert 0.6 < slow <= 1.0, slow
    # the run figure leaves the first (start-up) window out when later windows exist, as throughput does
    assert abs(dw.run_fraction() - slow) < 1e-9


def test_warning_fires_once_above_ten_percent_and_line_shows_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a tty: plain lines
    log = RunLogger(tmp_path, total_steps=30, start_step=0, enabled=True, progress=True, tensorboard=False)
    for step, wait in ((10, 0.04), (20, 0.25), (30, 0.5)):
        log.log(step, {"loss": 1.0, "img_s": 5.0, "data_wait": wait})
    out = capsys.readouterr().out
    assert "data wait 4.0%" in out and "data wait 25.0%" in out
    assert out.count("warning: the step waited for data") == 1
    assert "25.0% of the time in the window ending at step 20" in out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_wait"] for r in rows] == [0.04, 0.25, 0.5]


def test_run_writes_data_wait_to_metrics_and_summary(tmp_path, demo_dir, fresh_env):
    from test_train import train

    out = tmp_path / "run"
    r = train(out, demo_dir, "--max_steps=4", "--log_every=2", env=fresh_env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= row["data_wait"] <= 1.0 for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["data_wait"] <= 1.0
    assert "data wait " in r.stdout
