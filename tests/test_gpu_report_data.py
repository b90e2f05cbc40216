"""bench/gpu_report.py's data section: both DALI training-crop decodes timed beside the torch loader, and the
hardware JPEG decoder's load read from NVML where it exists (checked here with a stand-in NVML: no GPU)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report  # noqa: E402


def test_both_dali_decodes_are_timed_beside_the_torch_loader():
    pytest.importorskip("nvidia.dali")
    rows = gpu_report.section_data(torch.device("cpu"), gpu_report.QUICK_SIZES, workers=1)
    by = {r["loader"]: r for r in rows}
    assert list(by) == ["torch", "dali", "dali_whole"]
    assert all(r["img_s"] > 0 and r["error"] is None for r in rows), rows
    assert (by["dali"]["decode"], by["dali_whole"]["decode"]) == ("cpu, roi", "cpu, whole")
    assert by["dali"]["note"] == by["dali_whole"]["note"] == "hw decoder load: no GPU"
    assert by["torch"]["vs_torch"] == 1.0


def test_without_dali_both_dali_rows_say_not_installed(monkeypatch):
    real = gpu_report._version
    monkeypatch.setattr(gpu_report, "_version", lambda m: "not installed" if m == "nvidia.dali" else real(m))
    rows = gpu_report.section_data(torch.device("cpu"), gpu_report.QUICK_SIZES, workers=1)
    assert [(r["loader"], r["note"], r["img_s"]) for r in rows[1:]] == [("dali", "not installed", None),
                                                                        ("dali_whole", "not installed", None)]


def _fake_nvml(utilization: list[int] | None) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    if utilization is not None:
        values = iter(utilization)
        m.nvmlDeviceGetJpgUtilization = lambda h: (next(values, utilization[-1]), 100000)
    return m


def test_jpeg_engine_load_is_sampled_from_nvml_while_timing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([0, 40, 80, 60]))
    with gpu_report._JpegEngineLoad(torch.device("cuda", 0)) as engine:
        while len(engine.samples) < 3:
            pass
    assert engine.samples[:3] == [40.0, 80.0, 60.0]  # the first read (at start) only checks the counter exists
    assert engine.note().startswith("hw JPEG decoder busy") and "80% peak" in engine.note()


@pytest.mark.parametrize("nvml, reason", [(None, "pynvml not installed"), (_fake_nvml(None), "unavailable (AttributeError")])
def test_jpeg_engine_load_says_why_it_is_missing(monkeypatch, nvml, reason):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: import pynvml -> ImportError
    with gpu_report._JpegEngineLoad(torch.device("cuda", 0)) as engine:
        pass
    assert engine.note().startswith("hw decoder load: " + reason) and not engine.samples
    assert gpu_report._JpegEngineLoad(torch.device("cpu")).note() == "hw decoder load: no GPU"
