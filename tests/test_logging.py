"""Run logging: plain lines off a terminal, TensorBoard on/off and said so, W&B optional and offline-safe, curves."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from fastmae.engine.logger import RunLogger
from fastmae.viz import save_curves


def _run(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = RunLogger(tmp_path, total_steps=20, start_step=0, enabled=True, progress=True, **kw)
    for step in (10, 20):
        log.advance(10)
        log.log(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "img_s": 5.5})
    log.close()
    return log


def test_no_carriage_returns_when_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a tty
    _run(tmp_path, tensorboard=False)
    out = capsys.readouterr().out
    assert "\r" not in out and "\r" not in sys.stderr.getvalue()
    assert out.splitlines() == ["step 10/20 (50%)  loss 0.1  lr 0.01  5.5 img/s",
                                 "step 20/20 (100%)  loss 0.05  lr 0.02  5.5 img/s"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]


def test_tensorboard_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    log = _run(tmp_path)
    assert log.backends == [f"tensorboard: {tmp_path / 'tb'}"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_missing_or_disabled_is_said(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert _run(tmp_path / "a").backends == ["tensorboard: off (pip install tensorboard)"]
    assert _run(tmp_path / "b", tensorboard=False).backends == ["tensorboard: off (--tensorboard=false)"]
    assert not (tmp_path / "a" / "tb").exists()


def test_wandb_optional_and_offline_mode_respected(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, row, step):
            calls.setdefault("rows", []).append((step, row))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = _run(tmp_path, tensorboard=False, wandb="proj", config={"epochs": 3})
    assert "wandb: proj (offline)" in log.backends
    assert calls["init"]["project"] == "proj" and calls["init"]["config"] == {"epochs": 3}
    assert "mode" not in calls["init"]  # WANDB_MODE is wandb's to read
    assert [s for s, _ in calls["rows"]] == [10, 20] and calls["rows"][0][1]["loss"] == 0.1
    assert calls["finished"]
    # The same folder resumes the same W&B run.
    first = calls["init"]["id"]
    _run(tmp_path, tensorboard=False, wandb="proj")
    assert calls["init"]["id"] == first

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="pip install"):
        RunLogger(tmp_path, 10, 0, enabled=True, progress=False, tensorboard=False, wandb="proj")


def test_curves_png_has_both_panels(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path, tensorboard=False)
    png = save_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", title="mae-tiny")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (600, 500)
    (tmp_path / "empty.jsonl").write_text("")
    assert save_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
