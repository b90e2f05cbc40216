"""``fastmae sweep``: one run per value, a CSV and a labelled curve, value-by-value resume, pretraining keys."""

from __future__ import annotations

import csv
import json

from fastmae.eval import linprobe, sweep

TINY = ["--embed_dim=32", "--depth=2", "--num_heads=2", "--quiet=true", "--progress=false"]


def _rows(out):
    with (out / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


def test_protocol_key_sweep_writes_csv_and_curve_and_resumes(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["--protocol=finetune", '--values=tune_blocks=0,1', "--epochs=1", "--linprobe.epochs=2", *TINY,
            f"--output_dir={out}"]
    assert sweep.main(args) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [(r["tune_blocks"], r["protocol"]) for r in rows] == [("0", "finetune"), ("1", "finetune")]
    assert all(0 <= float(r["top1"]) <= 1 and r["reported"] == "test top-1 after the last epoch" for r in rows)
    assert (out / "sweep.png").stat().st_size > 10_000
    # k = 0 is the linear probe with its own recipe (LARS, its blr), and the linprobe.-prefixed key reached it
    k0 = json.loads((out / "tune_blocks=0" / "finetune" / "config.json").read_text())
    assert k0["protocol"]["tune_blocks"] == 0 and k0["schedule"]["epochs"] == 2
    assert k0["optim"]["blr"] == linprobe.LinprobeConfig().optim.blr
    first = (out / "tune_blocks=1" / "finetune" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    # rerun with one more value: only the new value runs
    assert sweep.main([*args[:1], '--values=tune_blocks=0,1,2', *args[2:]]) == 0
    printed = capsys.readouterr().out
    assert "tune_blocks=2 finetune: top-1" in printed and "tune_blocks=1 finetune" not in printed
    assert (out / "tune_blocks=1" / "finetune" / "results.json").stat().st_mtime_ns == first
    assert len(_rows(out)) == 3


def test_pretraining_key_sweep_pretrains_then_probes_and_finetunes(tmp_path, capsys):
    out = tmp_path / "mr"
    rc = sweep.main(['--values=mask_ratio=0.5,0.9', "--pretrain_epochs=1", "--epochs=1", "--quiet=true",
                     "--progress=false", f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [(r["mask_ratio"], r["protocol"]) for r in rows] == [
        ("0.5", "linprobe"), ("0.5", "finetune"), ("0.9", "linprobe"), ("0.9", "finetune")]
    for v in ("0.5", "0.9"):
        assert (out / f"mask_ratio={v}" / "mae_pretrained.pt").is_file()
    assert (out / "sweep.png").is_file()


def test_bad_sweeps_are_one_line(tmp_path, capsys):
    assert sweep.main(["--values=nokey=1,2", f"--output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("fastmae: error: cannot sweep --nokey")
    assert sweep.main(["--values=tune_blocks", f"--output_dir={tmp_path}"]) == 2
    assert "KEY=v1,v2" in capsys.readouterr().err
    assert sweep.main(["--values=epochs=1,-1", f"--output_dir={tmp_path}"]) == 2  # checked before any run
    assert "epochs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "epochs=1").exists()


def test_method_is_a_digits_pretraining_key(tmp_path, capsys):
    import torch

    out = tmp_path / "m"
    rc = sweep.main(["--values=method=mae,crossmae", "--pretrain_epochs=1", "--epochs=1", "--quiet=true",
                     "--progress=false", f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    assert [(r["method"], r["protocol"]) for r in _rows(out)] == [
        ("mae", "linprobe"), ("mae", "finetune"), ("crossmae", "linprobe"), ("crossmae", "finetune")]
    for method, cross in (("mae", False), ("crossmae", True)):
        ckpt = torch.load(out / f"method={method}" / "mae_pretrained.pt", weights_only=True)
        assert ckpt["method"] == method
        # CrossMAE's decoder reads the encoder through cross-attention (q from the queries, kv from the encoder)
        assert ("decoder_blocks.0.attn.kv.weight" in ckpt["model"]) == cross
        assert ("decoder_blocks.0.attn.qkv.weight" in ckpt["model"]) != cross


def test_other_keys_sweep_the_chosen_method_and_say_so(tmp_path, capsys):
    import torch

    out = tmp_path / "d"
    rc = sweep.main(["--values=decoder_depth=1,3", "--method=crossmae", "--pretrain_epochs=1", "--epochs=1",
                     "--quiet=true", "--progress=false", f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    for depth in (1, 3):
        sd = torch.load(out / f"decoder_depth={depth}" / "mae_pretrained.pt", weights_only=True)["model"]
        assert {k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")} == {str(i) for i in range(depth)}
        assert f"decoder_blocks.{depth - 1}.attn.kv.weight" in sd
    assert sweep.main(["--values=decoder_depth=1", "--method=nosuch", f"--output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error: unknown method 'nosuch'") and err.count("\n") == 1
    assert sweep.main(["--values=decoder_depth=1", "--method=simmim", "--pretrain_epochs=1",
                       f"--output_dir={tmp_path / 'y'}"]) == 2
    assert "has no digits-demo model taking these keywords" in capsys.readouterr().err


def test_a_real_data_pretraining_sweep_asks_fastmae_pretrain_about_its_key(tmp_path, capsys):
    """Evaluation imports no program (tests/test_layering.py): `fastmae pretrain --dry_run` judges the key."""
    args = [f"--data={tmp_path}/imagenet", f"--output_dir={tmp_path}/s", "--pretrain_args=--preset=tiny"]
    assert sweep.main(["--values=nokey=1,2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error: cannot sweep --nokey: fastmae pretrain refuses") and err.count("\n") == 1
    assert "unknown config key --nokey" in err
    assert sweep.main(["--values=mask_ratio=0.6,0.7", *args[:2], "--pretrain_args=--preset=nosuch"]) == 2
    assert "preset" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
