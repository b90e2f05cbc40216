"""The evaluation commands' config in sections: every flat key, default and preset of the flat layout kept, help
grouped by section, and stored configs of both layouts read (nested now, flat from earlier runs).

The fixtures were written by the flat ``EvalConfig`` (commit 50c3945): ``eval_configs_flat.json`` holds
``asdict`` of every protocol's config under its class defaults ("") and under each preset;
``eval_linprobe_config_flat.json`` is the config.json of a linear-probe run with non-default values.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fastmae.cli import main as fastmae
from fastmae.eval import finetune, linprobe
from fastmae.eval.config import SECTIONS, EvalOptimConfig, LinprobeConfig, stored_flat
from fastmae.eval.protocols import get_protocol
from fastmae.flags import flat_values, parse_flags, unique_keys

FIXTURES = Path(__file__).parent / "fixtures"
OLD = json.loads((FIXTURES / "eval_configs_flat.json").read_text())
OLD_RUN = FIXTURES / "eval_linprobe_config_flat.json"
TINY = ["--ckpt=random", "--embed_dim=32", "--depth=2", "--num_heads=2", "--quiet=true", "--progress=false"]


@pytest.mark.parametrize("protocol", sorted(OLD))
def test_every_flat_key_default_and_preset_is_kept(protocol):
    spec = get_protocol(protocol)
    assert {k.flat for k in unique_keys(spec.config)} == set(OLD[protocol][""])  # the same --keys, no more, no less
    for preset, old in OLD[protocol].items():
        new = spec.config() if not preset else parse_flags([f"--preset={preset}"], spec.config, spec.presets)
        assert flat_values(new) == old, (protocol, preset)


def test_flat_and_dotted_spellings_and_booleans():
    flat = parse_flags(["--blr=0.5", "--tune_blocks=0", "--data=", "--ckpt=random", "--no_progress", "--global_pool"],
                       LinprobeConfig)
    dotted = parse_flags(["--optim.blr", "0.5", "--protocol.tune_blocks=0", "--data.path=", "--model.ckpt=random",
                          "--logging.progress=false", "--model.global_pool=true"], LinprobeConfig)
    assert flat == dotted
    assert (flat.optim.blr, flat.logging.progress, flat.model.global_pool) == (0.5, False, True)
    assert isinstance(flat.step.compile, bool) and parse_flags(["--compile"], LinprobeConfig).step.compile is True


def test_a_section_checks_its_keys_and_the_command_its_own():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        EvalOptimConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="batch_size must be positive"):
        parse_flags(["--batch_size=0"], LinprobeConfig)
    with pytest.raises(ValueError, match=r"use `fastmae finetune --tune_blocks=2`"):
        parse_flags(["--tune_blocks=2"], LinprobeConfig)
    with pytest.raises(ValueError, match="knn_k must be >= 1"):
        parse_flags(["--knn_k=0"], get_protocol("knn").config)
    with pytest.raises(ValueError, match="unknown config key --knn_k"):
        parse_flags(["--knn_k=3"], LinprobeConfig)  # a command's own key is only its own


def test_linprobe_help_is_grouped_by_section(capsys):
    assert fastmae(["linprobe", "--help"]) == 0
    table = capsys.readouterr().out.split("\nkeys (")[1]
    assert re.findall(r"^(\w+):$", table, re.M) == ["run", *SECTIONS]
    for key in unique_keys(LinprobeConfig):
        assert len(re.findall(rf"^  --{key.flat}=", table, re.M)) == 1, key.flat
    assert "--blr=10.0 " in table.split("\noptim:\n")[1].split("\nschedule:\n")[0]


def test_config_of_an_old_flat_run_and_of_a_new_nested_one(tmp_path):
    old = json.loads(OLD_RUN.read_text())
    cfg = parse_flags([f"--config={OLD_RUN}"], LinprobeConfig, linprobe.PRESETS)
    assert flat_values(cfg) == old
    assert (cfg.optim.blr, cfg.schedule.epochs, cfg.model.global_pool, cfg.logging.progress) == (0.5, 3, True, False)
    nested = tmp_path / "config.json"
    nested.write_text(json.dumps(asdict(cfg)))
    assert parse_flags([f"--config={nested}"], LinprobeConfig, linprobe.PRESETS) == cfg
    assert stored_flat(asdict(cfg), LinprobeConfig) == stored_flat(old, LinprobeConfig) == old


def test_eval_only_reads_the_recorded_protocol_of_new_and_old_checkpoints(tmp_path, capsys):
    """A linear probe's classifier (BN + linear head, global pool) scored by `fastmae finetune --eval_only`, whose
    own defaults (tune_blocks=-1, cls pooling) build another head: only the recorded config makes it load."""
    run = tmp_path / "lp"
    assert linprobe.main([*TINY, "--epochs=1", "--global_pool", f"--output_dir={run}"]) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["protocol"]["tune_blocks"] == 0 and stored["model"]["global_pool"] is True  # nested now
    ckpt = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert ckpt["config"] == stored
    flat = dict(json.loads(OLD_RUN.read_text()), embed_dim=32, depth=2, num_heads=2)  # as an earlier run wrote it
    torch.save({**ckpt, "config": flat}, tmp_path / "old.pt")
    top1 = json.loads((run / "results.json").read_text())["top1"]
    for name in ("checkpoint-last.pt", "old.pt"):
        src = run / name if name != "old.pt" else tmp_path / name
        out = tmp_path / f"score-{name}"
        assert finetune.main(["--eval_only", f"--ckpt={src}", f"--output_dir={out}", "--quiet=true"]) == 0, (
            capsys.readouterr().err)
        assert json.loads((out / "results.json").read_text())["top1"] == pytest.approx(top1), name


def test_sweep_takes_section_keys_flat_dotted_and_per_protocol():
    from fastmae.eval import sweep

    own, per = sweep.split_argv(["--optim.blr=0.1", "--linprobe.schedule.epochs=2", "--values=blr=1,2"])
    assert own == ["--values=blr=1,2"]
    assert per["linprobe"] == ["--optim.blr=0.1", "--schedule.epochs=2"] and per["finetune"] == ["--optim.blr=0.1"]
    assert sweep.key_kind("optim.blr", demo=True) == sweep.key_kind("knn_k", demo=True) == "protocol"
    with pytest.raises(ValueError, match="prefix must be a protocol name"):
        sweep.split_argv(["--nope.blr=1"])


def test_a_stored_config_nested_by_section_is_range_checked_like_a_flat_one():
    from fastmae.convert import check_checkpoint_fields

    check_checkpoint_fields({"config": asdict(get_protocol("finetune-video").config())}, "ckpt")  # model.name: a name
    for bad in ({"model": {"img_size": 10**7}}, {"model": {"name": 3}}, {"img_size": 10**7}):
        with pytest.raises(ValueError, match="ckpt: config (img_size|model)="):
            check_checkpoint_fields({"config": bad}, "ckpt")
