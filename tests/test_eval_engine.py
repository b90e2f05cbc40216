"""Evaluation runs through the training engine and has pretraining's guarantees (issues 23 and 24 section 2):
the preemption vote across ranks, the damaged-checkpoint fallback, the run lock, no overwriting of another run,
no duplicated metrics rows after a kill, finite-only float flags, a sweep that stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmae.eval import finetune, linprobe, sweep

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["--ckpt=random", "--embed_dim=32", "--depth=2", "--num_heads=2", "--quiet=true", "--progress=false"]


def _start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "fastmae.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT, start_new_session=True)


def _loss_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if "loss" in r]


def _wait(p: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if p.poll() is not None:
            break
        time.sleep(0.05)
    _kill_tree(p)
    raise AssertionError(f"never ready: {p.communicate()[1][-3000:]}")


def _kill_tree(p: subprocess.Popen) -> None:
    r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True)
    for pid in [p.pid, *map(int, r.stdout.split())]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_to_one_rank_of_an_evaluation_saves_on_both_and_exits_0(tmp_path):
    out = tmp_path / "ft"
    p = _start(["finetune", *TINY, "--epochs=20", "--batch_size=16", "--log_every=1", f"--output_dir={out}"], nproc=2)
    _wait(p, lambda: len(_loss_rows(out)) >= 3)
    r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True)
    ranks = [int(x) for x in r.stdout.split()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)  # one rank hears it; the vote carries it to the other
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(p)
        raise AssertionError("hung after SIGTERM to one rank") from None
    assert p.returncode == 0, err[-3000:]
    ckpts = sorted(out.glob("checkpoint-0*.pt"))
    assert len(ckpts) == 1, ckpts  # mid-epoch: the preemption save, nothing else
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert len(ckpt["rng"]) == 2, "both ranks took part in the save (a collective at the agreed step)"
    assert ckpt["step"] >= 3 and not (out / "results.json").exists()


def test_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys):
    out = tmp_path / "lp"
    assert linprobe.main([*TINY, "--epochs=2", f"--output_dir={out}"]) == 0
    ckpts = sorted(out.glob("checkpoint-0*.pt"))
    assert len(ckpts) == 2
    data = bytearray(ckpts[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpts[-1].write_bytes(bytes(data))
    capsys.readouterr()
    assert linprobe.main([*TINY, "--epochs=3", f"--output_dir={out}", "--resume=auto"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {ckpts[-1].name}" in err and f"resuming from {ckpts[0].name}" in err, err
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_run"] == 3 and [r["epoch"] for r in res["history"]] == [0, 1, 2]


def test_a_fresh_run_never_overwrites_another_run(tmp_path, capsys):
    out = tmp_path / "ft"
    args = [*TINY, "--epochs=1", "--batch_size=64", f"--output_dir={out}"]
    assert finetune.main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    capsys.readouterr()
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error:") and "already holds another run" in err and "--resume=auto" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize("resume", [[], ["--resume=auto"]])
def test_eval_only_never_overwrites_an_earlier_runs_results(tmp_path, capsys, resume):
    """Scoring a classifier into a used folder (its own run's, or an earlier scoring's) is refused like a fresh
    run into a used folder: one line, nothing touched; into a new folder it writes its results."""
    out = tmp_path / "ft"
    assert finetune.main([*TINY, "--epochs=1", "--batch_size=64", f"--output_dir={out}"]) == 0
    score = [*TINY[1:], "--eval_only=true", f"--ckpt={out}/checkpoint-last.pt", "--batch_size=64", *resume]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert finetune.main([*score, f"--output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error:") and err.count("\n") == 1 and "--eval_only" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert finetune.main([*score, f"--output_dir={tmp_path / 'score'}"]) == 0
    assert json.loads((tmp_path / "score" / "results.json").read_text())["protocol"] == "eval_only"
    assert finetune.main([*score, f"--output_dir={tmp_path / 'score'}"]) == 2  # nor an earlier scoring's
    assert "results.json" in capsys.readouterr().err


def test_a_live_run_holds_its_folder(tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastmae.engine.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert finetune.main([*TINY, "--epochs=1", "--batch_size=64", f"--output_dir={out}"]) == 2
        assert "in use by another run" in capsys.readouterr().err
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("flag", ["--lr=nan", "--blr=inf", "--min_lr=inf", "--warmup_epochs=inf"])
def test_nonfinite_flags_are_refused(tmp_path, capsys, flag):
    assert finetune.main([*TINY, "--epochs=1", "--batch_size=64", flag, f"--output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "must be a finite number" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "results.json").exists()


def test_kill_and_resume_logs_every_step_once(tmp_path):
    """The state of a run SIGKILLed at step 13 after its checkpoint at step 10 (rows 11-13 and a torn line on disk),
    made deterministic: a finished run with the later checkpoints and the results removed."""
    out = tmp_path / "ft"
    args = [*TINY, "--epochs=1", "--batch_size=64", "--log_every=1", "--ckpt_every=5", "--keep_ckpts=10",
            f"--output_dir={out}"]
    assert finetune.main(args) == 0
    total = json.loads((out / "results.json").read_text())["step"]
    for p in out.iterdir():
        if p.name.startswith("checkpoint-") and not p.name.startswith(("checkpoint-00000005", "checkpoint-00000010")) \
                or p.name == "results.json":
            p.unlink()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(rows) if json.loads(line)["step"] > 13)
    (out / "metrics.jsonl").write_text("\n".join(rows[:cut]) + '\n{"step": 14, "lo')
    assert finetune.main([*args, "--resume=auto"]) == 0
    steps = [row["step"] for row in _loss_rows(out)]
    assert steps == list(range(1, total + 1)), steps
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(epochs) == 1, epochs


def test_sweep_stops_cleanly_when_a_run_is_preempted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "run_protocol", lambda name, cfg, **kw: {"status": "preempted", "step": 7})
    rc = sweep.main(["--protocol=linprobe", "--values=epochs=1,2", f"--output_dir={tmp_path}"])
    assert rc == 0
    assert "SIGTERM: epochs=1 linprobe saved at step 7" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["[1, 2]", '{"top1": 0.5}', "{not json", '{"top1": "x", "top5": 1, "top1_last": 1, '
                                     '"epoch": 0, "reported": "r", "wall_s": 1}', ""])
def test_a_damaged_sweep_results_file_is_a_one_line_error(tmp_path, capsys, content):
    done = tmp_path / "epochs=1" / "linprobe" / "results.json"
    done.parent.mkdir(parents=True)
    done.write_text(content)
    rc = sweep.main(["--protocol=linprobe", "--values=epochs=1", f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastmae: error:") and err.count("\n") == 1 and "delete it" in err, err


def test_pretraining_logs_the_knn_monitor_beside_the_loss(tmp_path, demo_dir):
    from fastmae.pretrain import main

    out = tmp_path / "mon"
    main([f"--data={demo_dir}", f"--output_dir={out}", "--max_steps=2", "--log_every=1", "--monitor=knn",
          "--monitor_every=2", "--no_progress", "--no_tensorboard", "--num_workers=0", "--img_size=32",
          "--patch_size=4", "--batch_size=8"])
    rows = _loss_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert "knn_top1" not in rows[0] and 0.1 < rows[1]["knn_top1"] <= 1.0  # well above chance: digits cluster


def test_monitor_flags_are_checked():
    from fastmae.config import parse_overrides

    with pytest.raises(ValueError, match="monitor must be knn"):
        parse_overrides(["--monitor=linprobe"])
    with pytest.raises(ValueError, match="monitor_every must be >= 0"):
        parse_overrides(["--monitor=knn", "--monitor_every=-1"])


_SLOW_RANK_1 = """
import sys, time
import torch.distributed as dist
from fastmae.eval import protocol

real = protocol.refuse_used_folder
def late(*args, **kwargs):
    if dist.is_initialized() and dist.get_rank() == 1:
        time.sleep(3)  # rank 0 has written this run's config.json by now
    return real(*args, **kwargs)
protocol.refuse_used_folder = late

from fastmae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _two_ranks(script: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    """Both ranks started directly, not under torchrun: its agent ends the other ranks as soon as one fails, so a
    rank's own error line could be cut off; here each rank runs to its end and keeps its stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": str(port)}) for r in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, None, err) for p, err in zip(procs, errs)]


def test_a_late_rank_never_takes_its_own_runs_folder_for_a_used_one(tmp_path):
    # Every rank used to judge the folder; a rank slower than rank 0 found the config.json rank 0 had just written
    # for this very scoring run and refused it (seen as a flaky 2-rank --eval_only test under load).
    trained = tmp_path / "trained"
    assert linprobe.main(["--epochs=1", "--progress=false", "--quiet=true", f"--output_dir={trained}"]) == 0
    script = tmp_path / "slow_rank_1.py"
    script.write_text(_SLOW_RANK_1)
    args = ["linprobe", "--eval_only=true", f"--ckpt={trained}/checkpoint-last.pt", "--progress=false", "--quiet=true",
            "--device=cpu", f"--output_dir={tmp_path / 'score'}"]
    for rank in _two_ranks(script, args):
        assert rank.returncode == 0, rank.stderr[-2000:]
    # a folder that IS used is still refused on every rank, in one line, without a hang
    for rank in _two_ranks(script, args):
        errors = [ln for ln in rank.stderr.splitlines() if ln.startswith("fastmae: error:")]
        assert rank.returncode != 0 and len(errors) == 1 and "already holds another run" in errors[0], rank.stderr[-2000:]
