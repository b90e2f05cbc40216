"""Issue 11, item 5: every config value is range-checked before any work (one line, exit 2)."""

from __future__ import annotations

import pytest

from fastmae.config import parse_overrides
from fastmae.pretrain import cli_main


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min_lr=-1"], "min_lr must be >= 0"),
        (["--lr=nan"], "lr must be a finite number"),
        (["--lr=inf"], "lr must be a finite number"),
        (["--lr=-0.1"], "lr must be >= 0"),
        (["--blr=-inf"], "blr must be a finite number"),
        (["--weight_decay=inf"], "weight_decay must be a finite number"),
        (["--mask_ratio=nan"], "mask_ratio must be a finite number"),
        (["--warmup_epochs=inf"], "warmup_epochs must be a finite number"),
        (["--clip_grad=nan"], "clip_grad must be a finite number"),
        (["--lr=0.001", "--min_lr=0.01"], "min_lr 0.01 is above lr 0.001"),
        (["--img_size=65536"], "img_size must be in [1, 4096]"),
        (["--img_size=4096", "--patch_size=8"], "more than 65536"),
        (["--img_size=32", "--patch_size=64"], "patch_size must be in [0, img_size=32]"),
        (["--num_vis=0"], "num_vis must be in [1, 64]"),
        (["--seed=-3"], "seed must be >= 0"),
    ],
)
def test_bad_value_is_rejected_by_the_parser(args, message):
    with pytest.raises(ValueError) as e:
        parse_overrides(args)
    assert message in str(e.value)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        parse_overrides([f"--output_dir={f}"])
    with pytest.raises(ValueError, match="lies under .* which is a file"):
        parse_overrides([f"--output_dir={f}/run"])
    parse_overrides([f"--output_dir={tmp_path}/new/run"])  # a folder still to be created is fine


@pytest.mark.parametrize("args", [["--lr=nan"], ["--img_size=65536"], ["--num_vis=0"], ["--weight_decay=inf"]])
def test_cli_reports_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args):
    from fastmae import pretrain

    started = []
    monkeypatch.setattr(pretrain, "main", lambda argv: started.append(argv))  # no training, whatever happens
    out = tmp_path / "run"
    assert cli_main([f"--output_dir={out}", *args]) == 2
    assert not started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmae: error:"), err
    assert not out.exists(), "the run folder was created before the config was checked"


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_config_file_is_one_line(tmp_path, capsys, depth):
    """Issue 24 s3: a hostile --config nested past Python's recursion limit is a one-line error, not RecursionError."""
    from fastmae.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text('{"data": ' + "[" * depth + "]" * depth + "}")
    for command in (cli_main, lambda argv: main(["export", "--ckpt=x.pt", f"--out={tmp_path}/o", *argv])):
        assert command([f"--config={cfg}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastmae: error: --config:") and "nested too deeply" in err and err.count("\n") == 1, err
