"""One command-line style everywhere: --key=value, dashes, official MAE names, bare booleans, --config, --help."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from fastmae.cli import COMMANDS
from fastmae.cli import main as fastmae
from fastmae.config import PretrainConfig, default_output_dir, parse_overrides


def test_spellings_and_official_aliases():
    cfg = parse_overrides(["--data_path=/x/imagenet", "--input_size", "96", "--batch-size=8", "--accum_iter=2",
                           "--output_dir=/tmp/r", "--blr=1e-3", "--warmup_epochs=1", "--model=mae_vit_tiny"])
    assert (cfg.data.path, cfg.data.img_size, cfg.optim.batch_size, cfg.optim.accum_iter, cfg.output_dir) == (
        "/x/imagenet", 96, 8, 2, "/tmp/r")
    assert parse_overrides(["--img-size=32"]).data.img_size == parse_overrides(["--img_size=32"]).data.img_size == 32


def test_bare_booleans():
    assert parse_overrides(["--no_norm_pix_loss"]).model.norm_pix_loss is False
    assert parse_overrides(["--no_norm_pix_loss", "--norm_pix_loss"]).model.norm_pix_loss is True
    assert parse_overrides(["--compile", "--epochs=2"]).step.compile is True
    cfg = parse_overrides(["--compile", "false", "--no-progress"])
    assert cfg.step.compile is False and cfg.logging.progress is False
    with pytest.raises(ValueError, match="takes no value"):
        parse_overrides(["--no_compile=true"])
    with pytest.raises(ValueError, match="expects true/false"):
        parse_overrides(["--compile=maybe"])


def test_default_run_folder_per_method_and_preset():
    assert parse_overrides([]).output_dir == "runs/mae-tiny"
    assert parse_overrides(["--preset=base"]).output_dir == "runs/mae-base"
    assert parse_overrides(["--method=simmim"]).output_dir == "runs/simmim-tiny"
    assert parse_overrides(["--preset=videomae_vit_base"]).output_dir == "runs/videomae-vit_base"
    assert parse_overrides(["--output_dir=elsewhere"]).output_dir == "elsewhere"
    assert default_output_dir("mae", "large") == "runs/mae-large"


def test_config_file_reruns_a_run_and_later_flags_win(tmp_path):
    first = parse_overrides(["--preset=small", "--epochs=7", "--no_norm_pix_loss", "--output_dir=runs/a"])
    path = tmp_path / "config.json"
    first.save(path)
    again = parse_overrides([f"--config={path}"])
    assert again == first
    changed = parse_overrides(["--epochs=1", f"--config={path}", "--output_dir=runs/b", "--img-size=32"])
    assert changed.schedule.epochs == 7  # an earlier flag is overridden by the file
    assert (changed.output_dir, changed.data.img_size, changed.model.norm_pix_loss) == ("runs/b", 32, False)
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads(path.read_text()), "ckpts": "x"}))
    with pytest.raises(ValueError, match="does not take: ckpts"):
        parse_overrides([f"--config={tmp_path / 'bad.json'}"])
    with pytest.raises(ValueError, match="no such file"):
        parse_overrides(["--config=missing.json"])


def test_unknown_key_names_the_flag_and_suggests():
    with pytest.raises(ValueError, match=r"unknown config key --batchsize; did you mean --batch_size"):
        parse_overrides(["--batchsize=3"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_key_with_value_and_description(command, capsys):
    assert fastmae([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    lines = re.split(r"\nkeys\b", out)[-1].splitlines()  # the key table (the docstring above it may quote flags)
    keys = [i for i, line in enumerate(lines) if line.startswith("  --")]
    assert keys, out
    for i in keys:
        line = lines[i]
        # "  --key=value  description", or a long value with the description on the next line
        described = re.match(r"  --\w+=\S.*?\s{2,}\S", line) or (
            i + 1 < len(lines) and lines[i + 1].startswith(" " * 20) and lines[i + 1].strip())
        assert described, f"{command}: key without a description: {line!r}"


def test_help_shows_preset_resolved_values(capsys):
    fastmae(["pretrain", "--preset=base", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"--epochs=800\s", out) and re.search(r"--output_dir=runs/mae-base\s", out)
    fastmae(["pretrain", "--help"])
    assert re.search(r"--epochs=100\s", capsys.readouterr().out)  # the tiny preset's, not the class default
    assert PretrainConfig().schedule.epochs != 100


def test_bad_flag_is_one_line_exit_2(capsys):
    for argv in (["pretrain", "--epochs=x"], ["linprobe", "--nope=1"], ["data", "check"], ["export", "--format=onnx"],
                 ["data", "pack", "a", "b", "--quality=x"]):
        assert fastmae(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastmae: error: "), (argv, err)


def test_data_check_takes_the_same_flags(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "train" / "a" / "x.jpg")
    assert fastmae(["data", "check", str(tmp_path), "--img-size=32"]) == 0
    assert fastmae(["data", "check", f"--path={tmp_path}", "--img_size", "32", "--deep"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out


def test_bench_scripts_take_both_spellings():
    from fastmae.flags import underscores

    assert underscores(["--img-size=32", "--no-csv", "--cpu-batch", "16", "x-y"]) == [
        "--img_size=32", "--no_csv", "--cpu_batch", "16", "x-y"]


def test_pretrain_help_is_grouped_by_section_with_every_key_once(capsys):
    from fastmae.config import SECTIONS
    from fastmae.flags import unique_keys

    assert fastmae(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    table = out.split("\nkeys (")[1]
    headings = re.findall(r"^(\w+)(?: \(--method=mae\))?:$", table, re.M)
    assert headings == ["run", *SECTIONS], headings
    for key in unique_keys(PretrainConfig):
        assert len(re.findall(rf"^  --{key.flat}=", table, re.M)) == 1, key.flat
        assert key.help, key.flat  # one home for help text: the field's metadata
    assert "--blr=" in table.split("\noptim:\n")[1].split("\nschedule:\n")[0]
    assert "--img_size=" in table.split("\ndata:\n")[1].split("\nmodel:\n")[0]


def _command_configs() -> dict[str, type]:
    """Every config class a command parses: those its module holds, and every protocol's and method's."""
    import dataclasses
    import importlib

    from fastmae.config import method_configs
    from fastmae.eval.protocols import get_protocol, list_protocols

    found = {}
    for module, _, _ in COMMANDS.values():
        for obj in vars(importlib.import_module(module)).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config"):
                found[obj.__name__] = obj
    found.update({get_protocol(p).config.__name__: get_protocol(p).config for p in list_protocols()})
    found.update({c.__name__: c for c in method_configs().values()})
    return found


def _fields_without_help(cls, prefix: str = "") -> list[str]:
    """Field paths of ``cls`` (its sections' fields included) whose own ``help`` metadata is missing."""
    import dataclasses
    import typing

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields_without_help(type(getattr(cls(), f.name)), f"{prefix}{f.name}.")
        elif not f.metadata.get("help"):
            out.append(prefix + f.name)
    return out


def test_every_key_of_every_command_has_help_in_its_field():
    """One home for help text: the field's metadata (no table of help strings beside the configs)."""
    import fastmae.flags

    configs = _command_configs()
    assert {"ExportConfig", "VisualizeConfig", "AnalyzeConfig", "DemoConfig", "SweepConfig", "PackConfig",
            "DataCheckConfig", "SubmitConfig", "PretrainConfig", "LinprobeConfig", "FinetuneConfig", "KnnConfig",
            "VideoFinetuneConfig"} <= set(configs)
    missing = {name: bad for name, cls in configs.items() if (bad := _fields_without_help(cls))}
    assert not missing, missing
    assert not hasattr(fastmae.flags, "KEY_HELP")


def test_another_methods_key_is_a_one_line_error(capsys):
    assert fastmae(["pretrain", "--method=simmim", "--tubelet_size=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastmae: error: --tubelet_size is a key of --method=videomae; --method=simmim does not take it"]


@dataclass
class ToyOptim:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})


@dataclass
class ToyConfig:
    seed: int = field(default=0, metadata={"help": "seed"})
    optim: ToyOptim = field(default_factory=ToyOptim)

    def validate(self):
        pass


def test_the_section_machinery_serves_any_command_config():
    """What EvalConfig would take to move to sections: the same parser, help and flat keys, for any dataclass."""
    from fastmae.flags import describe_keys, parse_flags

    assert parse_flags(["--lr=0.5"], ToyConfig).optim.lr == parse_flags(["--optim.lr", "0.5"], ToyConfig).optim.lr == 0.5
    assert describe_keys(ToyConfig).splitlines()[::3] == ["run:", "optim:"]
    with pytest.raises(ValueError, match="unknown config key --optim.momentum"):
        parse_flags(["--optim.momentum=0.9"], ToyConfig)
