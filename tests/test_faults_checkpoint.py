"""Issue 11, items 4-6: checkpoints are verified on load, resume falls back past damaged ones, a crafted or
foreign file gets one line, and a failed write (disk full) names the path and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastmae.convert import load_pretrained, model_state_dict, read_checkpoint
from fastmae.engine.checkpoint import load_checkpoint, remove_partial_writes, save_checkpoint

# CheckpointError is a ValueError and CheckpointWriteError an OSError: the tests catch the base classes
# so that they run (and fail) against the code before the fix too; names added by it are imported inside.
CheckpointError, CheckpointWriteError = ValueError, OSError

ROOT = Path(__file__).parent.parent


def _state(step: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4096, generator=g)}, "optimizer": {"state": {}, "param_groups": []},
            "step": step, "epoch": step // 5, "data": {"epoch": step // 5, "step": step % 5}, "rng": {}}


def _flip_byte(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    p = save_checkpoint(tmp_path, 2, _state(2), keep=3)
    assert Path(str(p) + ".json").is_file()
    _flip_byte(p)  # inside the tensor data: torch.load alone would hand back wrong weights
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        load_checkpoint(p)


def test_truncated_checkpoint_is_caught_by_its_size(tmp_path):
    p = save_checkpoint(tmp_path, 2, _state(2), keep=3)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is 1000 bytes, its checksum file says"):
        load_checkpoint(p)


def test_resume_auto_falls_back_to_the_newest_valid_checkpoint(tmp_path):
    from fastmae.engine.checkpoint import find_resume_checkpoint

    for s in (2, 4, 6):
        save_checkpoint(tmp_path, s, _state(s, seed=s), keep=3)
    _flip_byte(tmp_path / "checkpoint-00000006.pt")
    (tmp_path / "checkpoint-00000004.pt").write_bytes(b"")
    warnings: list[str] = []
    path, ckpt = find_resume_checkpoint(tmp_path, "auto", warnings.append)
    assert path.name == "checkpoint-00000002.pt" and ckpt["step"] == 2
    text = "\n".join(warnings)
    assert "skipping checkpoint-00000006.pt" in text and "skipping checkpoint-00000004.pt" in text
    assert "resuming from checkpoint-00000002.pt" in text


def test_resume_auto_with_only_damaged_checkpoints_says_so(tmp_path):
    from fastmae.engine.checkpoint import find_resume_checkpoint

    p = save_checkpoint(tmp_path, 2, _state(2), keep=3)
    _flip_byte(p)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume_checkpoint(tmp_path, "auto", lambda m: None)


def test_pruning_never_keeps_only_a_damaged_future_checkpoint(tmp_path):
    # A run resumed from 2 because 4 was damaged: saving 3 with keep=1 must keep 3, not only the damaged 4.
    for s in (2, 4):
        save_checkpoint(tmp_path, s, _state(s), keep=2)
    save_checkpoint(tmp_path, 3, _state(3), keep=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]


def test_crafted_step_and_types_are_refused(tmp_path):
    for bad, match in [({"step": -5}, "step must be a non-negative integer"),
                       ({"step": 2.5}, "step must be a non-negative integer"),
                       ({"epoch": -1}, "epoch must be a non-negative integer"),
                       ({"model": {"w": [1, 2, 3]}}, "non-tensor entries"),
                       ({"model": [torch.zeros(1)]}, "'model' holds a list"),
                       ({"data": "x"}, "'data' must be a dict")]:
        torch.save({**_state(2), **bad}, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "c.pt")


def test_position_must_fit_this_run():
    from fastmae.engine.checkpoint import check_position

    ok = _state(7)
    ok["data"] = {"epoch": 1, "step": 4}  # 7 steps x accum 2 = 14 batches = one epoch of 10 + 4
    check_position(ok, total_steps=10, steps_per_epoch=5, accum_iter=2, loader_steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="beyond this run's 6 steps"):
        check_position(ok, total_steps=6, steps_per_epoch=5, accum_iter=2, loader_steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="does not match step 7"):
        check_position(ok, total_steps=10, steps_per_epoch=5, accum_iter=1, loader_steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="epoch 3 does not match step 7"):
        check_position({**ok, "epoch": 3}, total_steps=10, steps_per_epoch=5, accum_iter=2, loader_steps_per_epoch=10)
    with pytest.raises(CheckpointError, match="position step=-1"):
        check_position({**ok, "data": {"epoch": 0, "step": -1}}, total_steps=10, steps_per_epoch=5, accum_iter=2,
                       loader_steps_per_epoch=10)


def test_official_weights_file_is_not_a_training_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "args": None}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="not a fastmae training checkpoint .* model weights only"):
        load_checkpoint(tmp_path / "official.pth")


@pytest.mark.parametrize("obj,match", [([torch.zeros(2)], "holds a list"), (torch.zeros(3), "holds a Tensor")])
def test_non_dict_checkpoint_files(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=match):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(ValueError, match=match):
        load_pretrained(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_non_tensor_state_dict_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"1 entries are not: bias \(str\)"):
        model_state_dict({"model": {"weight": torch.zeros(2, 2), "bias": "zeros"}})
    torch.save({"weight": torch.zeros(2, 2), "bias": [0.0, 0.0]}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"bias \(list\)"):
        load_pretrained(torch.nn.Linear(2, 2), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "args": "x"}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="no model weights found"):
        load_pretrained(torch.nn.Linear(2, 2), tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"bias \(list\)"):
        load_pretrained(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2), "bias": [0.0, 0.0]})


def test_failed_write_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure from the OS (file size limit: EFBIG) through torch's zip writer."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from fastmae.engine.checkpoint import save_checkpoint
        state = {{"model": {{"w": torch.randn(200_000)}}, "optimizer": {{}}, "step": 2, "data": {{}}, "rng": {{}}}}
        save_checkpoint({str(tmp_path)!r}, 2, state, keep=1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(tmp_path)!r}, 4, {{**state, "step": 4}}, keep=1)
        except Exception as e:
            print("ERROR", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ERROR cannot write checkpoint {tmp_path}/checkpoint-00000004.pt: File too large" in r.stdout
    assert "inline_container" not in r.stdout
    assert load_checkpoint(tmp_path / "checkpoint-00000002.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.json"]


def test_disk_full_message(tmp_path, monkeypatch):
    from fastmae.engine import faults

    monkeypatch.setattr(faults, "_current_step", -1)  # an in-process training run earlier may have moved it
    save_checkpoint(tmp_path, 2, _state(2), keep=1)
    monkeypatch.setenv("FASTMAE_FAULT", "disk_full@-1")
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(tmp_path, 4, _state(4), keep=1)
    assert str(e.value).startswith(f"no space left on device: {tmp_path}/checkpoint-00000004.pt")
    assert load_checkpoint(tmp_path / "checkpoint-00000002.pt")["step"] == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_startup_cleanup_removes_only_dead_writers_temp_files(tmp_path):
    import socket

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": tmp_path / f".tmp-{host}-{dead_pid}-abc123.pt",
            "live": tmp_path / f".tmp-{host}-{live.pid}-def456.pt",
            "other_host": tmp_path / f".tmp-elsewhere-{dead_pid}-ghi789.pt",
            "foreign": tmp_path / ".tmp-notes.pt",
        }
        for f in files.values():
            f.write_bytes(b"x")
        assert remove_partial_writes(tmp_path) == 1
        assert not files["dead"].exists()
        assert all(files[k].exists() for k in ("live", "other_host", "foreign"))
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize(
    "obj,match",
    [([torch.zeros(2)], "holds a list, expected a dict"),
     ({"model": {"cls_token": "x"}}, r"1 entries are not: cls_token \(str\)"),
     ({"args": 1}, "no model weights found")],
)
def test_linprobe_with_a_foreign_checkpoint_is_one_line(tmp_path, capsys, obj, match):
    import re

    from fastmae.cli import main

    torch.save(obj, tmp_path / "w.pt")
    assert main(["linprobe", f"--ckpt={tmp_path / 'w.pt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmae: error:") and re.search(match, err[0]), err


@pytest.mark.parametrize("at", [0.3, 0.5, 0.6, 0.75])
def test_flipped_bit_without_sidecar_is_caught_by_the_embedded_checksum(tmp_path, at):
    """Issue 24 s3: the sidecar lost (or never copied along), a bit flip must still be found, and resume
    falls back to the previous checkpoint with a warning."""
    from fastmae.engine.checkpoint import find_resume_checkpoint

    for s in (2, 4):
        save_checkpoint(tmp_path, s, _state(s, seed=s), keep=3)
    latest = tmp_path / "checkpoint-00000004.pt"
    Path(str(latest) + ".json").unlink()
    data = bytearray(latest.read_bytes())
    data[int(len(data) * at)] ^= 0x04  # one bit, in the tensor bytes or the pickle
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32|damaged|cannot read"):
        load_checkpoint(latest)
    with pytest.raises(ValueError, match="CRC-32|damaged|cannot read"):
        read_checkpoint(latest)  # export, visualize and evaluation read through here
    warnings: list[str] = []
    path, ckpt = find_resume_checkpoint(tmp_path, "auto", warnings.append)
    assert path.name == "checkpoint-00000002.pt" and "skipping checkpoint-00000004.pt" in warnings[0]
