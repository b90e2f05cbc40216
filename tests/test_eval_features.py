"""Frozen-encoder features computed once at scale: the on-disk store of ``fastmae.eval.features``.

The reference is the same probe with the encoder run on every training batch (``--features=off``): the data
order, the head and its optimizer are the same, so the training history must be the same. Data: fastmae's
demo photos as an ImageNet-style train/val tree (320 + 60 images), a random 64-wide encoder at 32 px.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmae.eval import linprobe
from fastmae.eval.features import StoreError, _sha256, open_store
from fastmae.eval.protocols import knn

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--num_workers=0", "--progress=false", "--quiet=true", "--batch_size=16", "--eval_batch_size=7",
          "--img_size=32", "--in_chans=3", "--augment=eval", "--epochs=2"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from fastmae.data import prepare_demo_dataset

    return prepare_demo_dataset(tmp_path_factory.mktemp("photos"))


def _run(tree: Path, out: Path, *extra: str, main=linprobe.main) -> dict:
    assert main([f"--data={tree}", *COMMON, f"--output_dir={out}", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _history(r: dict) -> list[tuple[float, float]]:
    return [(h["train_loss"], h["val_top1"]) for h in r["history"]]


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts the frozen encoder's batches (``protocol.encode``); ``calls.hook`` runs on each."""
    from fastmae.eval import protocol

    real, calls = protocol.encode, []

    def counting(vit, x, batch_size, amp_dtype):
        calls.append(len(x))
        if getattr(counting, "hook", None):
            counting.hook(len(calls))
        return real(vit, x, batch_size, amp_dtype)

    monkeypatch.setattr(protocol, "encode", counting)
    return counting, calls


def test_the_store_trains_like_the_encoder_on_every_step(tree, tmp_path):
    every_step = _run(tree, tmp_path / "off", "--features=off")
    stored = _run(tree, tmp_path / "auto")
    assert "frozen features from a store" in stored["data"] and "store" not in every_step["data"]
    a, b = np.array(_history(stored)), np.array(_history(every_step))
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-6)
    index = json.loads((tmp_path / "auto" / "features" / "index.json").read_text())
    assert index["rows"] == {"train": 320, "val": 60}
    assert not (tmp_path / "off" / "features").exists()
    # every row was written, labels equal the tree's class folders
    labels = np.load(tmp_path / "auto" / "features" / "val-labels.npy", allow_pickle=False)
    classes = sorted(p.name for p in (tree / "val").iterdir())
    expected = sorted(classes.index(p.parent.name) for p in (tree / "val").rglob("*.jpg"))
    assert sorted(labels.tolist()) == expected


def test_a_shared_store_is_reused_without_running_the_encoder(tree, tmp_path, encoder_calls, capsys):
    _, calls = encoder_calls
    store = tmp_path / "store"
    first = _run(tree, tmp_path / "one", f"--features={store}", "--quiet=false")
    n_first = len(calls)
    assert sum(calls) == 320 + 60
    second = _run(tree, tmp_path / "two", f"--features={store}", "--blr=20", "--quiet=false")
    assert len(calls) == n_first, "the second run encoded images"
    assert "reusing" in capsys.readouterr().out
    assert _history(first) != _history(second)  # a different learning rate on the same features
    # k-NN reads the same store: no encoder pass either
    r = _run(tree, tmp_path / "knn", f"--features={store}", "--epochs=1", main=knn.main)
    assert len(calls) == n_first and r["n_train"] == 320 and r["n_val"] == 60


def test_knn_from_the_store_equals_knn_on_the_fly(tree, tmp_path):
    on_the_fly = _run(tree, tmp_path / "a", "--features=off", main=knn.main)
    stored = _run(tree, tmp_path / "b", main=knn.main)
    assert (tmp_path / "b" / "features" / "index.json").is_file()
    assert stored["top1"] == on_the_fly["top1"] and stored["top5"] == on_the_fly["top5"]


def test_runs_of_another_encoder_get_their_own_store_in_a_shared_folder(tree, tmp_path, encoder_calls):
    _, calls = encoder_calls
    shared = tmp_path / "shared"
    _run(tree, tmp_path / "one", f"--features={shared}")
    other = _run(tree, tmp_path / "two", f"--features={shared}", "--seed=1")  # seed 1: another random encoder
    stores = sorted(p.name for p in shared.iterdir() if p.is_dir())
    assert len(stores) == 2 and sum(calls) == 2 * (320 + 60)
    again = _run(tree, tmp_path / "three", f"--features={shared}", "--seed=1")
    assert sum(calls) == 2 * (320 + 60) and _history(again) == _history(other)  # reused, not recomputed


def test_a_sweep_shares_one_store_between_its_runs(tree, tmp_path, encoder_calls):
    from fastmae.eval import sweep

    _, calls = encoder_calls
    out = tmp_path / "sweep"
    argv = ["--protocol=linprobe", "--values=blr=5,20", f"--output_dir={out}", f"--data={tree}", *COMMON]
    assert sweep.main(argv) == 0
    assert sum(calls) == 320 + 60, "each run of the sweep encoded the images again"
    assert len([p for p in (out / "features").iterdir() if p.is_dir()]) == 1


def test_a_damaged_store_in_the_run_folder_is_recomputed(tree, tmp_path, capsys):
    clean = _run(tree, tmp_path / "clean")
    run = tmp_path / "again"
    run.mkdir()
    (run / "features").mkdir()
    for p in (tmp_path / "clean" / "features").iterdir():
        (run / "features" / p.name).write_bytes(p.read_bytes())
    feats = run / "features" / "train-features.npy"
    data = bytearray(feats.read_bytes())
    data[-5] ^= 0x40
    feats.write_bytes(bytes(data))
    again = _run(tree, run, "--quiet=false")
    out = capsys.readouterr().out
    assert "computing them once" in out and "sha256" in out
    assert _history(again) == _history(clean)


class _Canary:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["FASTMAE_CANARY"]),))


def test_a_pickled_array_in_a_store_is_recomputed_without_unpickling(tree, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    clean = _run(tree, run)
    store = run / "features"
    canary = tmp_path / "PWNED"
    monkeypatch.setenv("FASTMAE_CANARY", str(canary))
    labels = store / "val-labels.npy"
    np.save(labels, np.array([_Canary()] * 60, dtype=object), allow_pickle=True)
    assert pickle.loads(pickle.dumps(_Canary())) is None and canary.exists()  # the planted object does run
    canary.unlink()
    index = json.loads((store / "index.json").read_text())  # rewritten to match: only allow_pickle=False stops it
    index["files"]["val-labels.npy"] = {"bytes": labels.stat().st_size, "sha256": _sha256(labels)}
    (store / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="do not load"):
        open_store(store, index["identity"], index["rows"], 10)
    for p in run.glob("checkpoint*"):
        p.unlink()
    (run / "results.json").unlink()
    (run / "metrics.jsonl").unlink()
    again = _run(tree, run, "--quiet=false")
    assert "do not load" in capsys.readouterr().out and not canary.exists()
    assert _history(again) == _history(clean)
    assert np.load(labels, allow_pickle=False).dtype == np.int64


@pytest.mark.parametrize("garbage", [b"{not json", b"[]", b'{"identity": 1, "files": {}}', b"[" * 100_000])
def test_a_garbage_index_is_one_line_and_recomputed(tree, tmp_path, capsys, garbage):
    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    (run / "features" / "index.json").write_bytes(garbage)
    with pytest.raises(StoreError, match="index") as e:
        open_store(run / "features", {}, {"train": 1}, 10)
    assert "\n" not in str(e.value)
    _run(tree, run, "--quiet=false")
    out = capsys.readouterr().out
    assert "computing them once" in out and "index" in out


def test_sigterm_during_extraction_exits_0_and_resume_continues_it(tree, tmp_path, encoder_calls, capsys):
    counting, calls = encoder_calls
    clean = _run(tree, tmp_path / "clean")
    clean_calls = len(calls)
    calls.clear()
    run = tmp_path / "cut"
    counting.hook = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 20 else None
    assert linprobe.main([f"--data={tree}", *COMMON, f"--output_dir={run}", "--quiet=false"]) == 0
    assert "SIGTERM" in capsys.readouterr().out
    assert not (run / "results.json").exists() and (run / "features.partial").is_dir()
    assert len(calls) == 20
    counting.hook = None
    resumed = _run(tree, run, "--resume=auto")
    assert len(calls) == clean_calls, "the resumed extraction encoded again what was flushed"
    assert _history(resumed) == _history(clean)
    for name in ("train-features.npy", "val-features.npy", "train-labels.npy"):
        a = np.load(run / "features" / name, allow_pickle=False)
        b = np.load(tmp_path / "clean" / "features" / name, allow_pickle=False)
        assert a.tobytes() == b.tobytes(), name  # data movement: bit for bit
    assert not (run / "features.partial").exists()


def test_two_gloo_ranks_write_one_store_like_one_rank(tree, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = _run(tree, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastmae.cli",
           "linprobe", f"--data={tree}", *COMMON, f"--output_dir={tmp_path / 'two'}", "--device=cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("train-labels.npy", "val-labels.npy", "train-features.npy", "val-features.npy"):
        a = np.load(tmp_path / "two" / "features" / name, allow_pickle=False)
        b = np.load(tmp_path / "one" / "features" / name, allow_pickle=False)
        if "labels" in name:
            assert (a == b).all(), name  # every row written by exactly the rank that owns it
        else:
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["n_val"] == one["n_val"] == 60


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run's clean-up code runs (it is not an Exception)."""


def test_a_killed_extraction_continues_from_its_last_flush(tree, tmp_path, encoder_calls, monkeypatch):
    from fastmae.eval import features

    counting, calls = encoder_calls
    clean = _run(tree, tmp_path / "clean")
    clean_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(features, "FLUSH_EVERY_S", 0.0)  # flush after every batch

    def kill(n: int) -> None:
        if n == 20:
            raise _Killed

    counting.hook = kill
    run = tmp_path / "cut"
    with pytest.raises(_Killed):
        linprobe.main([f"--data={tree}", *COMMON, f"--output_dir={run}"])
    counting.hook = None
    progress = json.loads((run / "features.partial" / "progress-train-rank0.json").read_text())
    assert progress == {"step": 19}  # batch 20 died inside the encoder, before its rows were written
    resumed = _run(tree, run, "--resume=auto")
    assert len(calls) == clean_calls + 1  # only the killed batch is encoded twice
    assert _history(resumed) == _history(clean)
    for name in ("train-features.npy", "train-labels.npy", "val-features.npy"):
        assert (run / "features" / name).read_bytes() == (tmp_path / "clean" / "features" / name).read_bytes(), name
