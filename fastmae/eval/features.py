"""Frozen-encoder features computed once, for the protocols under which the encoder never trains.

A linear probe without augmentation and k-NN see the same features of an image in every epoch, so the
encoder runs once per image instead of once per image per epoch. In-memory data (the digits) keeps its
features in memory (``fastmae.eval.protocol.frozen_feature_data``); streamed data writes them to a **store**
on disk, a folder that training memory-maps::

    STORE/index.json            what the features depend on, and each file's size and sha256 (written last)
    STORE/train-features.npy    (N_train, D) float32, row i = sample i of the split's table
    STORE/train-labels.npy      (N_train,) int64; IGNORE (-1) where the image could not be decoded
    STORE/val-features.npy, STORE/val-labels.npy

A store is used again only when its index says it was computed from **this** encoder (sha256 of its
weights, head excluded), **this** data (sha256 of each split's table: names, labels, image sizes, classes)
and **this** transform (image size, normalization, pooling, precision), and every file matches its recorded
size and sha256; ``.npy`` files are read with ``allow_pickle=False`` and their shapes and labels checked.
A store that does not match (or is damaged) is computed again, with a line saying why. ``--features=auto``
keeps the store in the run folder (``OUTPUT_DIR/features``); ``--features=DIR`` shares one folder between runs
(a learning-rate sweep, the other frozen protocols): each identity gets its own store ``DIR/<key>``
(:func:`store_key`), so runs of other encoders or data never meet there.

The extraction is written to ``STORE.partial`` by every rank at once (rank r writes the rows of its shard)
and is resumable: each rank records how many batches it has flushed, a preempted or killed extraction
continues from there, and the folder is renamed into place only after the index is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastmae.data.loader import BaseLoader
from fastmae.engine.distributed import DistInfo, agree
from fastmae.engine.runlock import RunFolderBusy, RunLock
from fastmae.eval.data import IGNORE

STORE_VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "val")
MAX_INDEX_BYTES = 16 << 20
UNWRITTEN = -2  # label of a row no rank has written yet: a finished extraction has none
FLUSH_EVERY_S = 30.0  # how much extraction a kill can cost


class StoreError(ValueError):
    """A feature store that cannot be used; the message is one line naming the problem."""


def _names(split: str) -> tuple[str, str]:
    return f"{split}-features.npy", f"{split}-labels.npy"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(vit: torch.nn.Module) -> str:
    """sha256 of the encoder's weights (the head excluded: the probe trains it)."""
    h = hashlib.sha256()
    for name, t in sorted(vit.state_dict().items()):
        if name.startswith("head."):
            continue
        # Deliberate sync, once before extraction: the weights are hashed on the host.
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def table_digest(loader: BaseLoader) -> str:
    """sha256 of a streamed split's sample table: what sample i is, for every i."""
    src = loader.source
    if src is None:
        raise StoreError(f"a {loader.kind} loader has no sample table to key a feature store on; use --features=off")
    locs = [loc if isinstance(loc, str) else list(loc) for loc in src.locs] if src.kind == "tar" else []
    table = [src.kind, list(src.names), list(src.labels), [list(s) for s in src.sizes], list(loader.classes), locs]
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()


def store_identity(vit: torch.nn.Module, tables: dict[str, str], *, img_size: int, mean, std, global_pool: bool,
                   amp_dtype: torch.dtype) -> dict:
    """Everything the stored features depend on (compared whole with a store's index)."""
    return {"version": STORE_VERSION, "encoder_sha256": weights_digest(vit), "tables_sha256": dict(tables),
            "transform": {"img_size": int(img_size), "augment": "eval", "mean": [float(m) for m in mean],
                          "std": [float(s) for s in std], "global_pool": bool(global_pool),
                          "precision": str(amp_dtype).replace("torch.", ""), "dim": int(vit.embed_dim)}}


# ---- reading ----------------------------------------------------------------------------------------------


def _read_index(store: Path) -> dict:
    path = store / INDEX
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise StoreError(f"{path} is larger than {MAX_INDEX_BYTES >> 20} MiB: not a feature store's index")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(index, dict) or not isinstance(index.get("identity"), dict) or not isinstance(
            index.get("files"), dict):
        raise StoreError(f"{path} is not a feature store's index (no identity or files)")
    return index


def _differences(found: dict, expected: dict) -> list[str]:
    keys = ("version", "encoder_sha256", "tables_sha256", "transform")
    return [k for k in keys if found.get(k) != expected[k]]


def _check_file(store: Path, name: str, files: dict, verify: bool) -> Path:
    path, entry = store / name, files.get(name)
    if not isinstance(entry, dict) or not path.is_file():
        raise StoreError(f"feature store {store}: {name} is missing")
    if path.stat().st_size != entry.get("bytes"):
        raise StoreError(f"feature store {store}: {name} has {path.stat().st_size} bytes, the index says "
                         f"{entry.get('bytes')}")
    if verify and _sha256(path) != entry.get("sha256"):
        raise StoreError(f"feature store {store}: {name} does not match its sha256 in the index (damaged)")
    return path


def _load_split(store: Path, split: str, files: dict, rows: int, dim: int, num_classes: int,
                verify: bool) -> tuple[np.ndarray, np.ndarray]:
    fname, lname = _names(split)
    try:
        x = np.load(_check_file(store, fname, files, verify), mmap_mode="r", allow_pickle=False)
        y = np.load(_check_file(store, lname, files, verify), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise StoreError(f"feature store {store}: {split} arrays do not load ({e})") from None
    if x.dtype != np.float32 or x.shape != (rows, dim) or y.dtype != np.int64 or y.shape != (rows,):
        raise StoreError(f"feature store {store}: {split} holds {x.dtype}{list(x.shape)} / {y.dtype}{list(y.shape)}, "
                         f"expected float32[{rows}, {dim}] / int64[{rows}]")
    if rows and (y.min() < IGNORE or y.max() >= num_classes):
        raise StoreError(f"feature store {store}: {split} labels outside [{IGNORE}, {num_classes})")
    return x, y


def open_store(store: Path, identity: dict, rows: dict[str, int], num_classes: int,
               verify: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features memory-mapped, labels)} of a store matching ``identity``; StoreError naming the problem.

    ``rows``: the sample count of each split's table. ``verify``: re-hash every file (skipped only right after
    this process wrote them).
    """
    if not (store / INDEX).is_file():
        raise StoreError(f"{store} is not a feature store (no {INDEX})")
    index = _read_index(store)
    stale = _differences(index["identity"], identity)
    if stale:
        raise StoreError(f"feature store {store} was computed with another {' and '.join(stale)}")
    dim = identity["transform"]["dim"]
    return {s: _load_split(store, s, index["files"], rows[s], dim, num_classes, verify) for s in rows}


# ---- writing ----------------------------------------------------------------------------------------------


def _plan(identity: dict, rows: dict[str, int], world_size: int, batch_size: int) -> dict:
    """What a partial extraction must share with this one to be continued."""
    return {"identity": identity, "rows": rows, "world_size": world_size, "batch_size": batch_size}


def _start_partial(partial: Path, plan: dict, dim: int) -> None:
    """Rank 0: keep a partial extraction made under the same plan, else start a new one (arrays preallocated)."""
    plan_file = partial / "plan.json"
    if plan_file.is_file():
        try:
            if json.loads(plan_file.read_text()) == plan and all(
                    (partial / n).is_file() for s in plan["rows"] for n in _names(s)):
                return
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            pass
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for split, n in plan["rows"].items():
        fname, lname = _names(split)
        np.lib.format.open_memmap(partial / fname, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
        np.save(partial / lname, np.full(n, UNWRITTEN, dtype=np.int64))
    plan_file.write_text(json.dumps(plan))


def _progress_file(partial: Path, split: str, rank: int) -> Path:
    return partial / f"progress-{split}-rank{rank}.json"


def _read_progress(partial: Path, split: str, rank: int, steps: int) -> int:
    try:
        step = json.loads(_progress_file(partial, split, rank).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return step if isinstance(step, int) and 0 <= step <= steps else 0


def _write_progress(partial: Path, split: str, rank: int, step: int) -> None:
    path = _progress_file(partial, split, rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, path)


def _extract_split(encode: Callable[[Tensor], Tensor], loader: BaseLoader, partial: Path, split: str, rank: int,
                   start: int, stop_now: Callable[[], bool]) -> bool:
    """Write this rank's rows of ``split`` from batch ``start`` on; False when preemption stopped it (progress
    flushed)."""
    fname, lname = _names(split)
    x = np.load(partial / fname, mmap_mode="r+", allow_pickle=False)
    y = np.load(partial / lname, mmap_mode="r+", allow_pickle=False)
    order, bs = loader.epoch_indices(0), loader.batch_size
    step = start
    if step >= loader.steps_per_epoch:
        return True
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": step})
    last_flush = time.monotonic()

    def flush(done: int) -> None:
        x.flush()
        y.flush()
        _write_progress(partial, split, rank, done)

    for imgs, labels in loader:
        real = max(0, min(bs, loader.num_valid - step * bs))  # the rest is wrap-around padding
        if real:
            rows = order[step * bs : step * bs + real]
            # Deliberate sync per extraction batch: the features go to disk.
            x[rows] = encode(imgs[:real]).cpu().numpy()
            y[rows] = labels[:real].cpu().numpy()
        step += 1
        if stop_now():
            flush(step)
            return False
        if time.monotonic() - last_flush > FLUSH_EVERY_S:
            flush(step)
            last_flush = time.monotonic()
    flush(step)
    return True


def _finish(partial: Path, store: Path, identity: dict, rows: dict[str, int]) -> None:
    """Rank 0: every row written, hashes into the index (written last), then the folder renamed into place."""
    files = {}
    for split in rows:
        fname, lname = _names(split)
        if (np.load(partial / lname, allow_pickle=False) == UNWRITTEN).any():
            raise StoreError(f"feature extraction into {partial} left {split} rows unwritten (ranks disagree on "
                             "the sharding); delete the folder and run again")
        for name in (fname, lname):
            files[name] = {"bytes": (partial / name).stat().st_size, "sha256": _sha256(partial / name)}
    for p in partial.iterdir():
        if p.name not in files:
            p.unlink()
    (partial / INDEX).write_text(json.dumps({"identity": identity, "rows": rows, "files": files}, indent=1) + "\n")
    if store.exists():
        shutil.rmtree(store)
    os.replace(partial, store)


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def build_store(store: Path, identity: dict, passes: dict[str, BaseLoader], encode: Callable[[Tensor], Tensor],
                info: DistInfo, stop_now: Callable[[], bool]) -> bool:
    """Extract every split's features into ``store`` (a collective); False when preempted (resumable)."""
    rows = {s: loader.num_samples for s, loader in passes.items()}
    partial = store.with_name(store.name + ".partial")
    batch = next(iter(passes.values())).batch_size
    with _store_lock(store) if info.is_main else nullcontext():
        error = None
        if info.is_main:
            try:
                _start_partial(partial, _plan(identity, rows, info.world_size, batch), identity["transform"]["dim"])
            except OSError as e:
                error = f"cannot write the feature store {partial}: {e.strerror or e}"
        error = agree(info, error)
        if error:
            raise StoreError(error)
        for split, loader in passes.items():
            if not _extract_split(encode, loader, partial, split, info.rank, _common_start(partial, split, loader, info),
                                  stop_now):
                return False
        _barrier(info)
        if info.is_main:
            try:
                _finish(partial, store, identity, rows)
            except (OSError, StoreError) as e:
                error = str(e)
        error = agree(info, error)
        if error:
            raise StoreError(error)
    return True


@contextmanager
def _store_lock(store: Path):
    """One extraction per store at a time (two runs sharing ``--features=DIR`` would interleave their rows)."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        lock = RunLock(store.parent, name=f".{store.name}.lock").acquire()
    except RunFolderBusy:
        raise StoreError(f"the feature store {store} is being computed by another run; wait for it or use "
                         "another --features folder") from None
    except OSError as e:
        raise StoreError(f"cannot write the feature store {store}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def _common_start(partial: Path, split: str, loader: BaseLoader, info: DistInfo) -> int:
    """The batch every rank continues from: the least any rank flushed (rows written twice are equal), so every
    rank runs the same number of batches and the preemption vote stays in step."""
    mine = _read_progress(partial, split, info.rank, loader.steps_per_epoch)
    if not info.enabled:
        return mine
    steps = [None] * info.world_size
    dist.all_gather_object(steps, mine)
    return min(steps)


# ---- the run's view ---------------------------------------------------------------------------------------


def store_key(identity: dict) -> str:
    """The folder name of ``identity``'s store inside a shared ``--features=DIR``: runs of different encoders,
    data or transforms share DIR without meeting."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _verdict(store: Path, identity: dict, rows: dict[str, int], num_classes: int) -> tuple[str, str]:
    """Rank 0: ("use", "") for a store that matches, else ("build", why it cannot be used)."""
    if not store.exists():
        return "build", ""
    try:
        open_store(store, identity, rows, num_classes, verify=True)
        return "use", ""
    except (StoreError, OSError) as e:
        return "build", str(e)


def frozen_store(vit: torch.nn.Module, store: Path, *, train: BaseLoader, val: BaseLoader,
                 train_pass: Callable[[], BaseLoader], encode: Callable[[Tensor], Tensor], identity: dict, info: DistInfo,
                 stop_now: Callable[[], bool], say: Callable[[str], None]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{"train"|"val": (features, labels)} from a validated store, computed first where needed (a collective);
    None when preemption stopped the extraction (flushed: the next run continues it).

    ``identity``: :func:`store_identity` of this encoder, data and transform. ``train_pass``: an in-order,
    eval-transform loader over the training split (built only when the store must be computed).
    """
    rows = {"train": train.num_samples, "val": val.num_samples}
    verdict, why = agree(info, _verdict(store, identity, rows, train.num_classes) if info.is_main else None)
    if verdict == "build":
        say(f"frozen features: computing them once into {store}" + (f" (the store there: {why})" if why else ""))
        t0 = time.perf_counter()
        if not build_store(store, identity, {"train": train_pass(), "val": val}, encode, info, stop_now):
            say(f"SIGTERM: frozen-feature extraction flushed into {store}.partial; --resume=auto continues it")
            return None
        say(f"frozen features: {rows['train']} + {rows['val']} images in {time.perf_counter() - t0:.1f}s")
    else:
        say(f"frozen features: reusing {store} (encoder, data and transform match; files verified)")
    # Rank 0 verified (or just wrote) every file; the other ranks check shapes and labels only.
    return open_store(store, identity, rows, train.num_classes, verify=False)


# ---- training on stored features --------------------------------------------------------------------------


class FeatureLoader(BaseLoader):
    """Batches of stored features with the loader contract (rank shards, ``(epoch, step)`` resume, padding labels).

    x: (N, D) float32, memory-mapped; y: (N,) int64. Training (``train=True``) leaves out the rows labelled
    IGNORE (undecodable images), shuffles per epoch and drops the last partial batch; evaluation keeps every row
    (IGNORE rows are never counted), in order. Each batch is gathered on the host and copied to ``device``.
    """

    kind = "features"

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, train: bool, seed: int, rank: int,
                 world_size: int, device: torch.device, classes: list[str]) -> None:
        keep = np.flatnonzero(y != IGNORE) if train else np.arange(len(y))
        super().__init__(num_samples=len(keep), batch_size=batch_size, img_size=x.shape[1], output="float",
                         train=train, shuffle=train, seed=seed, rank=rank, world_size=world_size, device=device,
                         drop_last=train, classes=classes)
        self.x, self.y, self.rows = x, y, keep

    def _batches(self, epoch, start):
        idx, bs = self.epoch_indices(epoch), self.batch_size
        pin = self.device.type == "cuda"
        for s in range(start, self.steps_per_epoch):
            rows = self.rows[idx[s * bs : (s + 1) * bs]]
            x, y = torch.from_numpy(self.x[rows]), torch.from_numpy(self.y[rows])
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
