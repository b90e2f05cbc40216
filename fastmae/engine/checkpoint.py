"""Atomic, verified, resumable training checkpoints.

A checkpoint is written to a temporary file in the run directory (named after
this host and pid), flushed and fsynced, then renamed over its final name (and
the directory fsynced), so a crash at any instant leaves either the previous
complete set or the new one, never a torn file. Next to ``checkpoint-S.pt`` a
sidecar ``checkpoint-S.pt.json`` records its size and sha256; loading checks
both, and ``--resume=auto`` falls back to the newest checkpoint that passes.
Everything loads with ``weights_only=True``: RNG states are stored as tensors
and lists, not pickled objects. ``--ckpt_format=dcp`` writes folders instead (:mod:`fastmae.engine.dcp`,
the same guarantees); listing, pruning, the fallback and loading here take both.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastmae.engine import faults

# A file (``.pt``) or a DCP folder (``.dcp``, :mod:`fastmae.engine.dcp`); both formats may share a run folder.
_NAME = re.compile(r"^checkpoint-(\d{8})\.(pt|dcp)$")
# Temporary files carry the writer's host and pid so start-up cleanup removes only those of dead writers.
_TMP = re.compile(r"^\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.(pt|json|dcp)$")
SIDECAR_SUFFIX = ".json"
TRAIN_KEYS = ("model", "optimizer", "step", "data", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoints are untouched."""

    def __str__(self) -> str:
        return self.strerror


def rng_state() -> dict:
    """Every RNG's state as plain Python lists and numbers (safe to pickle, gather and load weights-only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    if not state:  # a checkpoint without RNG states (tests, hand-made files): the current streams go on
        return
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def tmp_prefix() -> str:
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


class _HashingWriter:
    """File object for torch.save that hashes what it writes and keeps the first OS error.

    torch's zip writer swallows the OSError of a failed write and raises ``enforce fail at
    inline_container.cc`` instead; keeping the original error lets the caller say "no space left".
    """

    def __init__(self, f, fail_after: int | None = None):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None
        self._fail_after = fail_after

    def write(self, b) -> int:
        try:
            if self._fail_after is not None and self.size + len(b) > self._fail_after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(memoryview(b)[:n])
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


def write_error(path: Path, err: BaseException | None, fallback: BaseException) -> CheckpointWriteError:
    e = err if err is not None else fallback
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(code, f"no space left on device: {path} (earlier checkpoints are intact)")
    reason = os.strerror(code) if code else str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointWriteError(code or errno.EIO, f"cannot write checkpoint {path}: {reason} (earlier checkpoints are intact)")


def fsync_dir(d: Path) -> None:
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sidecar_path(path: Path) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically, with a size + sha256 sidecar written before the rename.

    Raises CheckpointWriteError (naming the path) on any write failure; nothing of an earlier file is lost.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), suffix=".pt", dir=path.parent)
    writer = None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f, fail_after=4096 if faults.active("disk_full") else None)
                torch.save(obj, writer)
                f.flush()
                faults.point("during_save")
                os.fsync(f.fileno())
            # The sidecar lands first: a checkpoint under its final name always has its checksum beside it.
            write_json_atomic({"step": obj.get("step"), "size": writer.size, "sha256": writer.sha.hexdigest()},
                               sidecar_path(path))
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            raise write_error(path, writer.error if writer else None, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial_writes(run_dir: Path) -> int:
    """Delete temporary files that killed saves on this host left behind (writer pid dead); returns how many.

    Files of a live writer, another host or an unknown naming are left alone: only the run holding the
    folder's lock calls this, and a live pid's file may be another run's save in progress.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return 0
    host, n = socket.gethostname(), 0
    for p in run_dir.iterdir():
        m = _TMP.match(p.name)
        if m and m.group("host") == host and not _pid_alive(int(m.group("pid"))):
            _remove(p)
            n += 1
    for side in run_dir.glob("checkpoint-*.pt" + SIDECAR_SUFFIX):  # a sidecar whose checkpoint rename never ran
        if not side.with_suffix("").exists():
            side.unlink(missing_ok=True)
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint ``step``, then prune to the newest ``keep`` at or before it.

    Checkpoints after ``step`` (an abandoned timeline: the run resumed from an earlier one because they
    were damaged) are neither counted nor deleted here; the run overwrites them when it gets there.
    """
    path = checkpoint_path(run_dir, step)
    atomic_save(state, path)
    prune_checkpoints(run_dir, step, keep)
    return path


def prune_checkpoints(run_dir: Path, step: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints at or before ``step`` (files with their sidecars, whole DCP
    folders)."""
    older = [p for p in list_checkpoints(run_dir) if step_of(p) <= step]
    for old in older[:-keep]:
        _remove(old)
        sidecar_path(old).unlink(missing_ok=True)


def verify_file(path: Path) -> bool:
    """Check a checkpoint against its sidecar (size, then sha256); CheckpointError names what is wrong.

    Returns False when there is no sidecar (lost, or an older version's file): loading then checks the
    CRC-32s the file carries inside (:func:`fastmae.convert.check_embedded_crc`).
    """
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        return False
    try:
        meta = json.loads(side.read_text())
        size, digest = int(meta["size"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable checksum file {side.name} ({e})") from None
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(f"checkpoint {path} is {actual} bytes, its checksum file says {size} (truncated or overwritten)")
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    if sha.hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} fails its sha256 check (corrupted on disk)")
    return True


def load_checkpoint(path: Path) -> dict:
    """A verified fastmae *training* checkpoint (model, optimizer, step, data position, RNG states).

    Raises CheckpointError with one line for a damaged file, a model-weights-only file (official MAE
    ``{'model': ...}`` or a bare state dict), or a file whose entries have the wrong types.
    """
    from fastmae.convert import check_checkpoint_fields, read_checkpoint

    path = Path(path)
    if path.is_dir() and path.name.endswith(".dcp"):
        from fastmae.engine.dcp import read_folder

        ckpt = read_folder(path)
        try:
            check_checkpoint_fields(ckpt, f"checkpoint {path}")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        checked = verify_file(path)
        try:
            ckpt = read_checkpoint(path, verify_crc=not checked)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    missing = [k for k in TRAIN_KEYS if k not in ckpt]
    if missing:
        hint = (" it holds model weights only (e.g. an official MAE file); --resume needs a checkpoint-*.pt "
                "written by fastmae pretrain" if "model" in ckpt or all(isinstance(v, torch.Tensor) for v in ckpt.values())
                else "")
        raise CheckpointError(f"{path} is not a fastmae training checkpoint (no {', '.join(missing)});{hint}".rstrip(";"))
    step = ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step must be a non-negative integer, got {step!r}")
    if "epoch" in ckpt and (not isinstance(ckpt["epoch"], int) or ckpt["epoch"] < 0):
        raise CheckpointError(f"checkpoint {path}: epoch must be a non-negative integer, got {ckpt['epoch']!r}")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)] if isinstance(ckpt["model"], dict) else None
    if bad is None or bad:
        what = f"non-tensor entries ({', '.join(map(str, bad[:3]))})" if bad else f"a {type(ckpt['model']).__name__}"
        raise CheckpointError(f"checkpoint {path}: 'model' holds {what}, expected a state dict of tensors")
    for key in ("optimizer", "data"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(f"checkpoint {path}: '{key}' must be a dict, got {type(ckpt[key]).__name__}")
    return ckpt


def find_resume_checkpoint(run_dir: Path, resume: str, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The checkpoint a run resumes from, loaded and verified, or None for a fresh start.

    ``resume="auto"``: the newest checkpoint in ``run_dir`` that verifies and loads; each damaged newer one
    is skipped with a warning naming it. An explicit path must verify and load (CheckpointError otherwise).
    """
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(Path(resume))
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, OSError) as e:
            skipped.append(path.name)
            warn(f"fastmae: warning: skipping {path.name}: {e}")
            continue
        if skipped:
            warn(f"fastmae: warning: resuming from {path.name} (skipped damaged {', '.join(skipped)})")
        return path, ckpt
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: every one is damaged ({', '.join(skipped)})")
    return None


def check_position(ckpt: dict, *, total_steps: int, steps_per_epoch: int, accum_iter: int,
                   loader_steps_per_epoch: int | None) -> None:
    """A checkpoint's step, epoch and data position must describe a point of *this* run's schedule."""
    step = ckpt["step"]
    if step > total_steps:
        raise CheckpointError(
            f"checkpoint is at step {step}, beyond this run's {total_steps} steps; raise --max_steps or --epochs"
        )
    if "epoch" in ckpt and ckpt["epoch"] != step // steps_per_epoch:
        raise CheckpointError(
            f"checkpoint epoch {ckpt['epoch']} does not match step {step} at {steps_per_epoch} steps per epoch"
        )
    data = ckpt["data"]
    for key in ("epoch", "step", "position"):
        if key in data and (not isinstance(data[key], int) or data[key] < 0):
            raise CheckpointError(f"checkpoint data position {key}={data[key]!r} must be a non-negative integer")
    if loader_steps_per_epoch and "step" in data and "epoch" in data:
        # The loop draws accum_iter batches per optimizer step, moving to the next epoch when one is used up.
        consumed = data["epoch"] * loader_steps_per_epoch + data["step"]
        if consumed != step * accum_iter or data["step"] > loader_steps_per_epoch:
            raise CheckpointError(
                f"checkpoint data position (epoch {data['epoch']}, batch {data['step']}) does not match step {step} "
                f"x accum_iter {accum_iter} at {loader_steps_per_epoch} batches per epoch"
            )
