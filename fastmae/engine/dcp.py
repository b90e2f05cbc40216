"""Checkpoint folders through ``torch.distributed.checkpoint`` (DCP): sharded under FSDP, asynchronous otherwise.

A DCP checkpoint is a folder ``checkpoint-S.dcp`` holding DCP's files (``__R_I.distcp`` tensor data, a
``.metadata`` index) and :data:`MANIFEST`, written last: the size and sha256 of every file, the step, and
everything of the checkpoint that is not a tensor (step, data position, RNG states, config, optimizer
hyper-parameters) as JSON. The folder is written under a temporary name (this host and the writing pid,
removed by :func:`fastmae.engine.checkpoint.remove_partial_writes` once that pid is dead) and renamed only
after the manifest is on disk, so a half-written folder is never a checkpoint.

Nothing is unpickled unchecked: DCP's ``FileSystemReader.read_metadata`` reads ``.metadata`` with a bare
``pickle.load``, and its planner loads non-tensor values with ``torch.load(weights_only=False)``. So only
tensors go through DCP (the rest lives in the manifest's JSON), every file is checked against the manifest's
size and sha256 *before* DCP opens any of them, and ``.metadata`` is then read by an unpickler that builds
only DCP's metadata classes, ``torch.Size`` and dtypes.

Version differences of ``torch.distributed.checkpoint`` (torch 2.11 on the GPU machines, 2.14 here) are
handled in :func:`_start_async` alone.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from fastmae.engine import faults
from fastmae.engine.checkpoint import CheckpointError, CheckpointWriteError, fsync_dir, tmp_prefix, write_error, write_json_atomic

MANIFEST = "fastmae-manifest.json"
SUFFIX = ".dcp"
FORMATS = ("file", "dcp", "auto")
_VERSION = 1


def resolve_format(fmt: str, world_size: int) -> str:
    """``auto``: DCP when several processes train (FSDP writes its shards in parallel instead of gathering the
    whole state on rank 0; under DDP rank 0 writes in the background while every rank steps on), the single
    ``.pt`` file on one process (one file every tool reads, and no second rank waits for it)."""
    if fmt == "auto":
        return "dcp" if world_size > 1 else "file"
    return fmt


def preload() -> None:
    """Import DCP now: the import takes seconds (3.1 s on the loaded test machine), which a SIGTERM save that
    happens to be the run's first DCP call must not spend out of torchrun's 30 s."""
    import torch.distributed.checkpoint  # noqa: F401


# ---- non-tensor skeleton <-> JSON ------------------------------------------------------------------------

def split_tensors(obj, path: str = "", out: dict | None = None):
    """(JSON-able skeleton, {key: tensor}): tensors replaced by their key; tuples and non-string dict keys tagged
    so :func:`join_tensors` rebuilds the same Python types (an optimizer's int state keys and ``betas`` tuple)."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        if path in out:
            raise ValueError(f"two checkpoint entries map to the tensor key {path!r}")
        out[path] = obj
        return {"__tensor__": path}, out
    if isinstance(obj, dict):
        items = [[split_tensors(k, "", {})[0], split_tensors(v, f"{path}/{k}", out)[0]] for k, v in obj.items()]
        return {"__dict__": items}, out
    if isinstance(obj, (list, tuple)):
        items = [split_tensors(v, f"{path}/{i}", out)[0] for i, v in enumerate(obj)]
        return ({"__tuple__": items} if isinstance(obj, tuple) else items), out
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, out
    raise TypeError(f"a DCP checkpoint stores tensors, containers and numbers, not {type(obj).__name__} at {path!r}")


def join_tensors(skel, tensors: dict):
    """Inverse of :func:`split_tensors`."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(join_tensors(v, tensors) for v in skel["__tuple__"])
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in skel["__dict__"]}
    if isinstance(skel, list):
        return [join_tensors(v, tensors) for v in skel]
    return skel


# ---- writing ----------------------------------------------------------------------------------------------

def folder_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}{SUFFIX}"


def _hash_files(folder: Path, names: list[str]) -> dict:
    out = {}
    for name in names:
        sha, size = hashlib.sha256(), 0
        with (folder / name).open("rb") as f:
            while chunk := f.read(1 << 24):
                sha.update(chunk)
                size += len(chunk)
        out[name] = {"size": size, "sha256": sha.hexdigest()}
    return out


def _finish(tmp: Path, final: Path, step: int, skeleton, files: dict) -> Path:
    """Manifest last, then the rename that makes the folder a checkpoint (an older folder of this step, from an
    abandoned timeline, is replaced)."""
    faults.point("during_save")  # the tests' SIGKILL with every data file written and no manifest yet
    write_json_atomic({"format": "fastmae-dcp", "version": _VERSION, "step": step, "files": files,
                       "skeleton": skeleton}, tmp / MANIFEST)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def _quiet_single_process() -> None:
    """DCP warns on every ``no_dist`` save and load that it assumes one process: that is the intent here."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _new_tmp(run_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=tmp_prefix(), suffix=SUFFIX, dir=run_dir))


def save_local(run_dir: Path, step: int, state: dict) -> Path:
    """One process's whole state (one rank, or rank 0 under DDP) as a DCP folder, blocking."""
    import torch.distributed.checkpoint as dcp

    _quiet_single_process()
    skeleton, tensors = split_tensors(state)
    tmp = _new_tmp(run_dir)
    with _cleanup(tmp, folder_path(run_dir, step)):
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        return _finish(tmp, folder_path(run_dir, step), step, skeleton, _hash_files(tmp, _data_files(tmp)))


@contextmanager
def _cleanup(tmp: Path, final: Path):
    """A failed write removes its temporary folder and says so in one line (CheckpointWriteError, as for files)."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (KeyboardInterrupt, SystemExit, CheckpointWriteError)):  # DCP's error is a BaseException
            raise write_error(final, _first_os_error(e), e) from e
        raise


def _first_os_error(e: BaseException | None) -> OSError | None:
    """DCP wraps a writer's OSError (in a CheckpointException holding a traceback per rank): find the original."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError):
            return e
        per_rank = list(getattr(e, "failures", {}).values())
        e, seen = (per_rank[0] if per_rank else e.__cause__ or e.__context__), seen + 1
    return None


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def _stage(tensors: dict) -> dict:
    """Private copies on the CPU: the step goes on updating the parameters and optimizer state in place while the
    background thread writes these."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


class AsyncSaver:
    """Rank 0's background DCP writes: at most one in flight; :meth:`wait` returns its folder or raises its error."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def start(self, run_dir: Path, step: int, state: dict, after=None) -> Path:
        self.wait()  # deliberate sync: one write in flight; the previous one lands (or raises) before the next
        _quiet_single_process()
        skeleton, tensors = split_tensors(state)
        final = folder_path(run_dir, step)
        tmp = _new_tmp(run_dir)
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmae-ckpt")
        with _cleanup(tmp, final):
            upload = _start_async(tensors, tmp, self._pool)  # the CPU copy happens here: the step's only wait

        def finish() -> Path:
            with _cleanup(tmp, final):
                upload.result()
                path = _finish(tmp, final, step, skeleton, _hash_files(tmp, _data_files(tmp)))
            if after is not None:
                after(path)
            return path

        self._pending = self._pool.submit(finish)
        return final

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is complete; its exception is raised here."""
        fut, self._pending = self._pending, None
        return fut.result() if fut is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _start_async(tensors: dict, folder: Path, pool: ThreadPoolExecutor) -> Future:
    """Copy ``tensors`` to private CPU memory now and write them in the background; the future of the write. The one
    place that knows torch versions.

    DCP's ``async_save`` copies (its default stager) in this thread and writes in its own. It takes ``no_dist`` from
    torch 2.7 on and, from 2.9, may return an ``AsyncSaveResponse`` (whose ``upload_completion`` is the future).
    With a process group that has no CPU backend (NCCL alone) it refuses even a ``no_dist`` save: that case, and
    older torch, copy here and run the blocking ``save`` on ``pool``; the step loop waits for the copy either way.
    """
    import inspect

    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(str(folder))
    fn = getattr(dcp, "async_save", None)
    cpu_pg = not (dist.is_available() and dist.is_initialized()) or torch.device("cpu") in getattr(
        dist.distributed_c10d._get_default_group(), "_device_types", [])
    if fn is None or "no_dist" not in inspect.signature(fn).parameters or not cpu_pg:
        return pool.submit(dcp.save, _stage(tensors), storage_writer=writer, no_dist=True)
    res = fn(tensors, storage_writer=writer, no_dist=True)
    return getattr(res, "upload_completion", res)


def save_sharded(run_dir: Path, step: int, tensors: dict, skeleton, rank: int) -> Path | None:
    """Every rank writes its own shards (DTensors) into one folder, nothing gathered; a collective. Each rank
    hashes the files it wrote, rank 0 ``.metadata``, and rank 0 writes the manifest and renames the folder."""
    import torch.distributed.checkpoint as dcp

    box = [str(_new_tmp(run_dir)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank writes into rank 0's temporary folder
    tmp = Path(box[0])
    failed = None
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)))
        mine = _hash_files(tmp, sorted(p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")))
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; every rank must
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # reach the gather below, or the others hang in it
            raise
        failed, mine = write_error(folder_path(run_dir, step), _first_os_error(e), e), {}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine if failed is None else None)
    if rank != 0:
        if failed is not None:
            raise failed
        return None
    with _cleanup(tmp, folder_path(run_dir, step)):
        if failed is not None or any(p is None for p in parts):
            raise failed or OSError(errno.EIO, "another rank failed to write its shards")
        files = {k: v for p in parts for k, v in p.items()} | _hash_files(tmp, [".metadata"])
        return _finish(tmp, folder_path(run_dir, step), step, skeleton, files)


# ---- reading ----------------------------------------------------------------------------------------------

def _listed(man: dict) -> dict[str, tuple[int, str]]:
    """{file name: (size, sha256)} of a manifest."""
    return {str(k): (int(v["size"]), str(v["sha256"])) for k, v in man["files"].items()}


def read_manifest(folder: Path) -> dict:
    """The manifest, after every file it lists passed its size and sha256 check (CheckpointError otherwise)."""
    folder = Path(folder)
    try:
        man = json.loads((folder / MANIFEST).read_text())
        files = _listed(man)
        step = man["step"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (an unfinished or foreign DCP folder)") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({e})") from None
    if ".metadata" not in files or any("/" in k or k.startswith("..") for k in files):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} does not list .metadata (or names files outside)")
    for name, (size, digest) in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder}: {name} is {p.stat().st_size} bytes, its manifest says {size} "
                                  "(truncated or overwritten)")
        if _hash_files(folder, [name])[name]["sha256"] != digest:
            raise CheckpointError(f"checkpoint {folder}: {name} fails its sha256 check (corrupted or replaced)")
    man["step"] = step
    return man


_META_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, ``torch.Size`` and dtypes; any other global in the file is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _META_CLASSES or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def _reader(folder: Path):
    import torch.distributed.checkpoint as dcp

    class _Reader(dcp.FileSystemReader):
        """DCP's reader with ``.metadata`` read by :class:`_MetadataUnpickler` instead of ``pickle.load``."""

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            md = read_metadata(folder)
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader(str(folder))


def read_metadata(folder: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(io.BytesIO((Path(folder) / ".metadata").read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable .metadata ({str(e)[:200]})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"checkpoint {folder}: .metadata holds a {type(md).__name__}, not DCP metadata")
    return md


def read_folder(folder: Path) -> dict:
    """A verified DCP checkpoint, consolidated into the dict a ``.pt`` checkpoint holds (full tensors on the CPU,
    also from FSDP's shards); reads without a process group, so every rank (or ``fastmae export``) can call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    _quiet_single_process()
    man = read_manifest(folder)
    md = read_metadata(folder)
    entries = md.state_dict_metadata
    if not all(isinstance(m, TensorStorageMetadata) for m in entries.values()):
        raise CheckpointError(f"checkpoint {folder}: holds non-tensor entries (not written by fastmae)")
    # The shapes come from the file: bounded before anything is allocated (DCP stores every tensor's bytes, so the
    # tensors cannot be larger than the data files that passed the manifest's check).
    data_bytes = sum(size for name, (size, _) in _listed(man).items() if name != ".metadata")
    want = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in entries.values())
    if any(d < 0 for m in entries.values() for d in m.size) or want > data_bytes:
        raise CheckpointError(f"checkpoint {folder}: .metadata declares {want} bytes of tensors, its data files hold "
                              f"{data_bytes}")
    full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()}
    try:
        dcp.load(full, storage_reader=_reader(folder), no_dist=True)
        return join_tensors(man["skeleton"], full)
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; one line naming the folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {folder}: cannot read ({first[:300]})") from None


def size_bytes(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def timed_note(path: Path, seconds: float) -> str:
    """``checkpoint 0.42 GB in 1.3 s (3.1 s/GB)``: what a save cost, for the preemption budget."""
    gb = size_bytes(path) / 1e9
    return f"checkpoint {gb:.3g} GB in {seconds:.2g} s ({seconds / max(gb, 1e-12):.3g} s/GB)"
