"""bench/gpu_report.py --quick: the GPU report's code, run at tiny sizes on the CPU (what CI can check)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("gpu_report")
    assert gpu_report.main(["--quick", "--out", str(out), "--demo-cache", str(demo_dir.parent)]) == 0
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text()


def test_quick_report_has_every_section(quick_report):
    report, md = quick_report
    assert report["errors"] == {}
    for title in ("## Environment", "## Kernels K1-K3", "## Attention kernels per shape", "## Training step",
                  "## Profile of one", "## Data loader",
                  "## Residual stream dtype"):
        assert title in md
    env = report["env"]
    for key in ("torch", "triton", "dali", "flash_attn", "transformers", "gpu", "kernels"):
        assert key in env


def test_kernels_are_timed_against_eager_and_compiled_references(quick_report):
    rows = quick_report[0]["kernels"]
    for kernel in ("K1 patchify+gather", "K2 unshuffle scatter", "K3 norm-pix loss"):
        impls = {r["impl"]: r for r in rows if r["kernel"] == kernel}
        assert set(impls) == {"eager reference", "compiled reference", "fused (Triton)"}
        for r in impls.values():
            assert r["error"] is None, r
            if r["fwd_ms"] is not None:
                assert 0 < r["fwd_p20"] <= r["fwd_ms"] <= r["fwd_p80"] and r["GBps"] > 0
        if kernel != "K1 patchify+gather":  # K1 reads uint8 images: no backward in the step
            assert impls["eager reference"]["fwd_bwd_ms"] > 0


def test_attention_kernels_are_timed_per_shape_with_the_choice_marked(quick_report):
    rows = quick_report[0]["attention"]
    for part in ("encoder", "decoder"):
        part_rows = [r for r in rows if r["part"] == part]
        assert {r["kernel"] for r in part_rows} >= {"eager", "sdpa"}
        assert [r["kernel"] for r in part_rows if r["chosen"]] == ["sdpa"]  # CPU: torch picks its own SDPA kernel
        assert min(r["vs_fastest"] for r in part_rows) == 1.0
        assert all(r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 for r in part_rows)  # timings are reported, never compared


def test_step_modes_and_ratios_against_the_reference(quick_report):
    rows = quick_report[0]["step"]
    modes = {r["mode"]: r for r in rows}
    assert set(modes) == {"reference (eager, reference ops)", "eager", "compiled", "HF ViTMAE (eager)"}
    errored = {r["mode"]: r["error"] for r in rows if r["error"]}
    assert not errored, f"step modes that errored: {errored}"
    assert modes["reference (eager, reference ops)"]["vs_reference"] == 1.0
    for r in rows:
        if r["note"] == "not installed":
            continue
        assert r["img_s"] > 0 and r["p20_ms"] <= r["step_ms"] <= r["p80_ms"], r
    assert modes["compiled"]["compile"] == "aot_eager"


def test_a_contender_that_errors_keeps_every_key(monkeypatch):
    """A failing mode is a row with its error text and None figures, not a row without keys."""
    def broken(*a, **k):
        raise RuntimeError("planted failure\nsecond line")

    monkeypatch.setattr(gpu_report, "_hf_step", broken)
    sizes = gpu_report.replace(gpu_report.QUICK_SIZES, warmup=0, repeats=1)
    rows = gpu_report.section_step(gpu_report.torch.device("cpu"), sizes, gpu_report.torch.bfloat16, None)
    keys = set(gpu_report.STEP_FIGURES) | {"error", "note", "model", "mode", "batch", "dtype"}
    assert all(set(r) >= keys for r in rows)
    hf = [r for r in rows if r["mode"].startswith("HF")]
    if hf[0]["note"] != "not installed":
        assert hf[0]["error"] == "RuntimeError: planted failure" and hf[0]["img_s"] is None and hf[0]["vs_reference"] is None
    ran = [r for r in rows if not r["mode"].startswith("HF")]
    assert all(r["error"] is None and r["img_s"] > 0 for r in ran)
    assert "planted failure" in gpu_report.to_markdown({"mode": "quick", "command": "x", "step": rows}) or hf[0]["note"]


def test_profile_shares_sum_to_one(quick_report):
    share = quick_report[0]["profile"]["share"]
    assert sum(share.values()) == pytest.approx(1.0)
    assert {"GEMM", "attention"} <= set(share)


def test_residual_ab_uses_the_same_start(quick_report):
    fp32, bf16 = quick_report[0]["residual"]
    assert (fp32["residual_dtype"], bf16["residual_dtype"]) == ("fp32", "bf16")
    assert fp32["first_loss"] == pytest.approx(bf16["first_loss"], rel=2e-2)  # same weights, data and masks
    assert bf16["delta_vs_fp32"] == pytest.approx(bf16["final_loss"] - fp32["final_loss"])


def test_missing_optional_parts_give_not_installed_rows(monkeypatch, tmp_path):
    real = gpu_report._version
    monkeypatch.setattr(gpu_report, "_version", lambda m: "not installed" if m == "nvidia.dali" else real(m))
    rows = gpu_report.section_data(gpu_report.torch.device("cpu"), gpu_report.QUICK_SIZES, workers=1)
    dali = next(r for r in rows if r["loader"] == "dali")
    assert dali["note"] == "not installed" and dali["img_s"] is None and dali["error"] is None
    assert next(r for r in rows if r["loader"] == "torch")["img_s"] > 0


def test_bad_arguments_are_one_line(capsys):
    assert gpu_report.main(["--quick", "--sections", "kernels,warp"]) == 2
    assert capsys.readouterr().err.startswith("fastmae: error: unknown sections ['warp']")
