"""Issue 20 item 11: DCP checkpoint folders (``--ckpt_format=dcp``) keep every guarantee of the ``.pt`` files.

Unit tests on :mod:`fastmae.engine.dcp` (round trip, manifest, planted ``.metadata``, fallback, rotation, the
background write's private copy); the training command on one process (resume bit-identical, SIGTERM, export)
is in this file too; 2 gloo ranks (DDP and FSDP2) are in ``test_dcp_distributed.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from fastmae.engine import dcp
from fastmae.engine.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
)


def _state(step: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    return {
        "model": {"w": w, "b": torch.randn(4, generator=g).to(torch.bfloat16), "n": torch.arange(3)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(8, 4, generator=g)}},
                      "param_groups": [{"params": [0], "betas": (0.9, 0.95), "lr": torch.tensor(1e-3), "eps": 1e-8,
                                        "foreach": None, "amsgrad": False}]},
        "step": step, "epoch": 0, "data": {"epoch": 0, "step": step}, "rng": {},
        "config": {"clip": float("inf"), "name": "x"},
    }


def _assert_same(a, b, where: str = "") -> None:
    kind = lambda x: dict if isinstance(x, dict) else type(x)  # noqa: E731 - an OrderedDict is read back as a dict
    assert kind(a) is kind(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_round_trip_keeps_every_value_and_python_type(tmp_path):
    state = _state(3)
    path = dcp.save_local(tmp_path, 3, state)
    assert path.name == "checkpoint-00000003.dcp" and (path / dcp.MANIFEST).is_file()
    _assert_same(state, load_checkpoint(path))  # int keys, the betas tuple, inf, None, bf16: all as written


def test_half_written_folder_is_never_a_checkpoint(tmp_path):
    dcp.save_local(tmp_path, 2, _state(2))
    later = dcp.save_local(tmp_path, 4, _state(4))
    (later / dcp.MANIFEST).unlink()  # e.g. copied by hand without it: nothing vouches for .metadata
    with pytest.raises(CheckpointError, match="no fastmae-manifest.json"):
        load_checkpoint(later)
    shutil.rmtree(later)
    partial = tmp_path / ".tmp-somehost-1-abc.dcp"  # a save killed before its rename
    shutil.copytree(tmp_path / "checkpoint-00000002.dcp", partial)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.dcp"]


def test_damaged_latest_folder_falls_back_with_a_warning(tmp_path):
    dcp.save_local(tmp_path, 2, _state(2))
    bad = dcp.save_local(tmp_path, 4, _state(4))
    data = next(bad.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    warnings: list[str] = []
    path, ckpt = find_resume_checkpoint(tmp_path, "auto", warnings.append)
    assert path.name == "checkpoint-00000002.dcp" and ckpt["step"] == 2
    assert "skipping checkpoint-00000004.dcp" in warnings[0] and "sha256" in warnings[0]


class _Planted:
    """Unpickling this runs ``open(marker, "w")``: what a planted ``.metadata`` could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_planted_metadata_is_refused_before_anything_unpickles_it(tmp_path):
    import torch.distributed.checkpoint as tdcp

    folder = dcp.save_local(tmp_path, 2, _state(2))
    marker = tmp_path / "unpickled"
    size = (folder / ".metadata").stat().st_size
    planted = pickle.dumps(_Planted(marker))  # padded to the real size: the unpickler stops at its STOP opcode
    (folder / ".metadata").write_bytes(planted + b"\0" * (size - len(planted)))
    # The control: DCP's own reader does run the planted file (so the file is live, and the check is needed).
    with pytest.raises(BaseException):  # noqa: B017 - whatever DCP makes of the opened file; the marker is the point
        tdcp.load({"model/w": torch.empty(8, 4)}, storage_reader=tdcp.FileSystemReader(str(folder)), no_dist=True)
    assert marker.exists()
    marker.unlink()
    # fastmae's load: the sha256 check fails before DCP opens .metadata.
    with pytest.raises(CheckpointError, match=r"\.metadata fails its sha256 check"):
        load_checkpoint(folder)
    assert not marker.exists()
    # A manifest rewritten to match (the attacker can write the whole folder): the restricted unpickler refuses.
    man = json.loads((folder / dcp.MANIFEST).read_text())
    man["files"][".metadata"] = dcp._hash_files(folder, [".metadata"])[".metadata"]
    (folder / dcp.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"\.open is not part of DCP metadata"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_metadata_declaring_huge_tensors_is_refused_before_any_allocation(tmp_path):
    """A hostile folder with a rewritten manifest passes the sha256 check; its shapes must still be bounded."""
    folder = dcp.save_local(tmp_path, 2, _state(2))
    md = dcp.read_metadata(folder)
    key = next(iter(md.state_dict_metadata))
    md.state_dict_metadata[key].size = torch.Size([10**6, 10**6])  # 4 TB of fp32
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    man = json.loads((folder / dcp.MANIFEST).read_text())
    man["files"][".metadata"] = dcp._hash_files(folder, [".metadata"])[".metadata"]
    (folder / dcp.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"declares \d+ bytes of tensors"):
        load_checkpoint(folder)


def test_rotation_deletes_whole_folders_and_startup_removes_dead_writers_folders(tmp_path):
    for step in (1, 2, 3):
        dcp.save_local(tmp_path, step, _state(step))
    prune_checkpoints(tmp_path, 3, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002.dcp", "checkpoint-00000003.dcp"]
    dead = tmp_path / f".tmp-{os.uname().nodename}-999999999-x1.dcp"
    live = tmp_path / f".tmp-{os.uname().nodename}-{os.getpid()}-x2.dcp"
    for d in (dead, live):
        shutil.copytree(tmp_path / "checkpoint-00000002.dcp", d)
    assert remove_partial_writes(tmp_path) == 1
    assert not dead.exists() and live.exists()


@pytest.mark.parametrize("path", ["async_save", "own thread"])
def test_background_write_saves_the_values_of_its_step_while_training_goes_on(tmp_path, monkeypatch, path):
    """The step loop returns at once and goes on updating the tensors in place; the folder holds the values of
    the step it was started at (a private copy), and appears only when the write is complete. ``own thread``: the
    path for a process group without a CPU backend (NCCL alone) and for torch without ``async_save(no_dist=)``."""
    import torch.distributed.checkpoint as tdcp

    release, started = threading.Event(), threading.Event()
    real_write = tdcp.FileSystemWriter.write_data

    def gated(self, *args, **kwargs):  # DCP's writer blocks until the test has stepped on
        started.set()
        assert release.wait(60)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(tdcp.FileSystemWriter, "write_data", gated)
    if path == "own thread":
        monkeypatch.delattr(tdcp, "async_save")
    state = _state(2)
    before = state["model"]["w"].clone()
    saver = dcp.AsyncSaver()
    final = saver.start(tmp_path, 2, state)
    assert started.wait(60)
    state["model"]["w"].add_(1.0)  # the next optimizer step
    assert not final.exists() and list_checkpoints(tmp_path) == []
    release.set()
    assert saver.wait() == final
    assert torch.equal(load_checkpoint(final)["model"]["w"], before)
    saver.close()


def test_background_write_error_is_one_line_at_the_next_wait(tmp_path, monkeypatch):
    from fastmae.engine.checkpoint import CheckpointWriteError

    def full(tensors, folder, pool):
        return pool.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))

    monkeypatch.setattr(dcp, "_start_async", full)
    saver = dcp.AsyncSaver()
    saver.start(tmp_path, 2, _state(2))
    with pytest.raises(CheckpointWriteError, match="no space left on device: .*checkpoint-00000002.dcp"):
        saver.wait()
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone too


# ---- the training command on one process -----------------------------------------------------------------

RUN = ["--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32",
       "--log_every=1", "--ckpt_every=2", "--keep_ckpts=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dir):
    """The same seed four steps: straight through as DCP, as DCP stopped at 2 and resumed, and as a .pt file run."""
    from fastmae.pretrain import cli_main

    base = tmp_path_factory.mktemp("dcp_runs")
    out = {name: base / name for name in ("dcp", "resumed", "file")}
    common = [f"--data={demo_dir}", *RUN]
    assert cli_main([*common, f"--output_dir={out['dcp']}", "--max_steps=4", "--ckpt_format=dcp"]) == 0
    assert cli_main([*common, f"--output_dir={out['resumed']}", "--max_steps=2", "--ckpt_format=dcp"]) == 0
    assert cli_main([*common, f"--output_dir={out['resumed']}", "--max_steps=4", "--ckpt_format=dcp",
                     "--resume=auto"]) == 0
    assert cli_main([*common, f"--output_dir={out['file']}", "--max_steps=4"]) == 0
    return out


def test_one_process_dcp_resume_is_bit_identical_and_matches_the_file_run(runs):
    straight = load_checkpoint(runs["dcp"] / "checkpoint-00000004.dcp")
    resumed = load_checkpoint(runs["resumed"] / "checkpoint-00000004.dcp")
    for key in ("model", "optimizer", "data", "step"):
        _assert_same(straight[key], resumed[key], key)
    from_file = torch.load(runs["file"] / "checkpoint-00000004.pt", weights_only=True)
    _assert_same(from_file["model"], straight["model"], "model")  # the format changes nothing of the training
    assert sorted(p.name for p in runs["dcp"].glob("checkpoint-*")) == ["checkpoint-00000002.dcp",
                                                                       "checkpoint-00000004.dcp"]
    summary = json.loads((runs["dcp"] / "summary.json").read_text())
    assert summary["checkpoint_save"].startswith("checkpoint ") and "s/GB" in summary["checkpoint_save"]


@pytest.mark.parametrize("fmt", ["timm", "pth"])
def test_export_from_a_dcp_run_equals_export_from_the_file_run(runs, tmp_path, fmt):
    from safetensors.torch import load_file

    from fastmae.export import main as export_main

    for name in ("dcp", "file"):
        assert export_main([f"--ckpt={runs[name]}", f"--out={tmp_path / name}", f"--format={fmt}"]) == 0
    if fmt == "timm":
        a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("dcp", "file"))
    else:
        a, b = (torch.load(tmp_path / n / "checkpoint.pth", weights_only=True)["model"] for n in ("dcp", "file"))
        assert len(a) == len(torch.load(runs["file"] / "checkpoint-00000004.pt", weights_only=True)["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_with_dcp_saves_blocking_exits_zero_and_prints_seconds_per_gb(tmp_path, demo_dir, fresh_env):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "pre"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *RUN, "--max_steps=100000",
           "--ckpt_every=1", "--ckpt_format=dcp"]  # background saves in flight at every step when the signal comes
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fresh_env,
                         cwd=Path(__file__).parent.parent)
    deadline, metrics = time.time() + 180, out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    last = list_checkpoints(out)[-1]
    step = load_checkpoint(last)["step"]
    line = next(x for x in stdout.splitlines() if "SIGTERM: saved" in x)
    assert f"SIGTERM: saved {last} at step {step}; exiting (checkpoint " in line and line.endswith(" s/GB))")
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # nothing left half-written


def test_bad_format_is_one_line_and_auto_picks_dcp_on_several_processes(capsys):
    from fastmae.pretrain import cli_main

    assert cli_main(["--ckpt_format=zip"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastmae: error: ckpt_format must be file, dcp or auto, got 'zip'"
    assert [dcp.resolve_format("auto", n) for n in (1, 2, 8)] == ["file", "dcp", "dcp"]
    assert dcp.resolve_format("dcp", 1) == "dcp" and dcp.resolve_format("file", 8) == "file"


def test_bench_ckpt_prints_seconds_per_gb_for_every_contender():
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, "bench/bench_ckpt.py", "--mb=8", "--rounds=1"], capture_output=True, text=True,
                       cwd=root, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ") and "s/GB" not in line}
    assert set(rows) == {"file", "dcp", "dcp-async stall", "dcp-async total"}, r.stdout
    assert "| 1.00x |" in rows["file"]


def test_sigkill_during_a_background_dcp_save_then_resume_is_bit_identical(runs, tmp_path, demo_dir, fresh_env):
    """The kill lands after DCP wrote its files and before the manifest and the rename (``during_save``, in the
    background thread): the temporary folder is never taken for a checkpoint, start-up removes it, and the
    resumed run ends where the straight one did."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", f"--data={demo_dir}", f"--output_dir={out}", *RUN, "--max_steps=4",
           "--ckpt_format=dcp"]
    root = Path(__file__).parent.parent
    # "2+": the first save to reach its manifest at or after step 2 (the background thread sees the loop's step).
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300,
                       env={**fresh_env, "FASTMAE_FAULT": "during_save@2+"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [p for p in out.iterdir() if p.name.startswith(".tmp-") and p.name.endswith(".dcp")]
    assert list_checkpoints(out) == []  # the killed save is no checkpoint
    r = subprocess.run([*cmd, "--resume=auto"], capture_output=True, text=True, cwd=root, timeout=300, env=fresh_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    got = load_checkpoint(out / "checkpoint-00000004.dcp")
    ref = load_checkpoint(runs["dcp"] / "checkpoint-00000004.dcp")
    for key in ("model", "optimizer"):
        _assert_same(ref[key], got[key], key)
