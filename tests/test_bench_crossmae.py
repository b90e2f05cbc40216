"""bench/bench_crossmae.py at tiny sizes: the speed table's columns, quality over seeds (kept per run), the curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_crossmae  # noqa: E402

QUICK_EVAL = ["--pretrain_epochs", "1", "--probe_epochs", "1", "--partial_epochs", "1", "--finetune_epochs", "1"]


@pytest.fixture
def rows(monkeypatch):
    """The rows the bench would append to bench/results/bench_crossmae.csv (kept here instead)."""
    kept: list[dict] = []
    monkeypatch.setattr(bench_crossmae, "append_csv", lambda r: kept.extend(r) or Path("unused.csv"))
    return kept


def test_speed_reports_step_and_marginal_ratios_and_flops(rows, capsys):
    bench_crossmae.main(["speed", "--cases", "tiny", "--batches", "2", "4", "--repeats", "1", "--warmup", "0"])
    assert {(r["precision"], r["contender"]) for r in rows} == {
        (p, c) for p in ("fp32", "bf16") for c in ("MAE", "CrossMAE", "CrossMAE no fusion")}
    for r in rows:
        assert (r["batch_lo"], r["batch"]) == (2, 4) and r["median_ms"] > 0 and r["median_ms_lo"] > 0
        want = (r["median_ms"] - r["median_ms_lo"]) / 2
        assert r["marginal_ms_per_img"] == pytest.approx(want, abs=0.01)
        if r["contender"] == "MAE":
            assert r["speedup_vs_mae"] == 1.0 and r["flops_ratio_vs_mae"] == 1.0
        else:  # 16 of 64 patches decoded instead of 65 tokens: fewer FLOPs by the counter, whatever the timing
            assert r["flops_ratio_vs_mae"] > 1.3
    assert "marginal ms/img" in capsys.readouterr().out


def test_quality_runs_each_seed_once_and_averages(rows, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quality", *QUICK_EVAL, "--seeds", "0", "1", "--output_dir", str(out),
            "--contenders", "mae", "crossmae", "crossmae_equal_flops"]
    bench_crossmae.main(args)
    found = json.loads((out / "quality.json").read_text())
    assert {k: len(v) for k, v in found.items()} == {"random": 2, "mae": 2, "crossmae": 2, "crossmae_equal_flops": 2}
    # MAE's pretraining compute: CrossMAE decodes 4 of 16 digit patches, ~1.9x fewer FLOPs, so 1 epoch -> 2
    assert [r["pretrain_epochs"] for r in found["crossmae_equal_flops"]] == [2, 2]
    assert [r["pretrain_epochs"] for r in found["crossmae"]] == [1, 1]
    for tag in ("mae", "crossmae"):
        for r in found[tag]:
            assert set(r) >= {"linear probe", "partial fine-tune", "full fine-tune"}
            assert all(0.0 <= r[n] <= 1.0 for n in bench_crossmae.PROTOCOL_NAMES)
    table = capsys.readouterr().out
    assert "| CrossMAE (pred 0.25, fusion) | 2 |" in table and "+-" in table
    stamp = (out / "seed1" / "crossmae.json").stat().st_mtime_ns
    bench_crossmae.main(args)  # every (seed, contender) is on disk: nothing reruns
    assert (out / "seed1" / "crossmae.json").stat().st_mtime_ns == stamp
    assert "seed 1 crossmae:" not in capsys.readouterr().out


def test_curves_draw_both_methods_through_fastmae_sweep(rows, tmp_path, capsys):
    figs, out = tmp_path / "figs", tmp_path / "c"
    bench_crossmae.main(["curves", *QUICK_EVAL, "--mask_ratios", "0.5", "0.75", "--decoder_depths", "1", "2",
                         "--output_dir", str(out), "--figures_dir", str(figs)])
    for key in ("mask_ratio", "decoder_depth"):
        assert (figs / f"crossmae_digits_vs_{key}.png").stat().st_size > 10_000
        for method in ("mae", "crossmae"):
            assert (out / f"{method}_{key}" / "sweep.csv").is_file()
    seen = {(r["sweep"], r["contender"], r["value"], r["protocol"]) for r in rows}
    assert ("decoder_depth", "crossmae", "1", "linprobe") in seen and ("mask_ratio", "mae", "0.5", "finetune") in seen
    assert len(seen) == 2 * 2 * 2 * 2
    # the default point (mask 0.75, depth 2) is on both curves and pretrained once per method
    for method in ("mae", "crossmae"):
        a, b = out / f"{method}_mask_ratio" / "mask_ratio=0.75", out / f"{method}_decoder_depth" / "decoder_depth=2"
        assert (a / "linprobe" / "results.json").read_text() == (b / "linprobe" / "results.json").read_text()
    assert "decoder_depth=2: pretrained" not in capsys.readouterr().out
