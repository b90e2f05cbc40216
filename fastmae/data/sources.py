"""Sample sources: ImageFolder directories and webdataset-style tar shards.

Both sources are scanned once at build time into a flat, indexable table (path or tar member, label,
width, height). The table is what makes sharding, shuffling and resume exact: every loader addresses
samples by their global index into it, so the order is a pure function of (seed, epoch) and never of
worker count, file-system listing order or tar streaming order. Tar shards are indexed once (member
offsets) and read by offset with ``os.pread``: sample-level shuffling across all shards, which needs
seekable storage (local disk, NFS, Lustre), not a byte stream. A webdataset sample is the members
sharing a key (path up to the first dot of the basename): one image member, and ``.cls`` (a text
integer) as the label (-1 when absent). Class-folder ids are the sorted folder names, shared by the
``train/`` and ``val/`` splits of one root (see :func:`open_source`).

Bad input, two layers:

1. Pre-scan (here, cheap, every build): each file's header is parsed with PIL (format, mode, size: a
   few KB read), and its tail is checked for the format's end marker (JPEG ``FFD9``, PNG ``IEND``), which
   catches truncated downloads without decoding. Non-images, truncated JPEG/PNG, unreadable files and
   images smaller than ``min_size`` px on a side are left out of the table and listed in ``bad``.
   Reads are bounded: a 64 KiB head (16 MiB for JPEGs with large metadata blocks), a 64 B tail, and for
   a suspected truncation either a full decode (files up to 16 MiB) or a search of the last 1 MiB.
   Grayscale, CMYK, RGBA/palette and PNG files are valid: both loaders convert them to RGB.
   Empty class folders keep their class id (so labels stay stable) and are listed in ``empty_classes``.
2. Runtime fallback (in the loaders): a file that passes the scan but fails to decode (corrupt entropy
   data) is replaced by a deterministic substitute - the next index in the table that decodes - and
   recorded in the loader's ``bad_files``. The substitute's augmentation is drawn from the failed
   sample's (seed, epoch, index) stream, so runs stay reproducible and resume stays exact.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..constants import IMAGE_EXTENSIONS
from .text import printable

log = logging.getLogger("fastmae.data")

_HEAD_BYTES = 1 << 16
_TAIL_BYTES = 64
# JPEGs may carry large APPn blocks (EXIF, ICC, XMP) before the frame header: the retry window.
_MAX_HEADER_BYTES = 16 << 20
# A missing end marker is confirmed by a full decode only up to this size; beyond it, by looking for
# the marker (followed by a trailer) in the last _TRAILER_SEARCH bytes. Reads stay bounded either way.
_MAX_CONFIRM_BYTES = 16 << 20
_TRAILER_SEARCH = 1 << 20
_INDEX_VERSION = 2
# One encoded image (an 8K x 8K PNG is well below it); a bigger file (a sparse multi-GB file that passed the
# header scan) is refused without being read.
MAX_SAMPLE_BYTES = 128 << 20
# A .cls member holds one integer label.
_MAX_CLS_BYTES = 64

__all__ = ["Source", "open_source", "resolve_spec", "split_classes", "expand_braces", "check_bytes"]


@dataclass
class Source:
    """A scanned, clean sample table. Index ``i`` addresses ``locs[i]`` with label ``labels[i]``.

    ``locs[i]`` is a file path (folder source) or ``(tar_path, offset, size)`` (tar source).
    ``sizes[i]`` is ``(width, height)`` from the header, needed to draw crop windows on the host.
    """

    kind: str  # "folder" | "tar"
    root: str
    locs: list
    labels: list[int]
    sizes: list[tuple[int, int]]
    names: list[str]
    classes: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.locs)

    def read_bytes(self, i: int) -> bytes:
        """The encoded sample, at most MAX_SAMPLE_BYTES (ValueError beyond: the loaders substitute it)."""
        loc = self.locs[i]
        if isinstance(loc, str):
            with open(loc, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read(MAX_SAMPLE_BYTES + 1) if size <= MAX_SAMPLE_BYTES else b""
            size = max(size, len(data))  # a file that grew after the stat is still capped
        else:
            path, offset, size = loc
            data = b""
            if size <= MAX_SAMPLE_BYTES:
                with open(path, "rb") as f:
                    data = os.pread(f.fileno(), size, offset)
        if size > MAX_SAMPLE_BYTES:
            raise ValueError(f"{printable(self.names[i])}: more than {MAX_SAMPLE_BYTES >> 20} MiB for one image")
        return data


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset brace patterns: ``a-{000..003}.tar`` (zero-padded ranges) and ``{x,y}``."""
    if "{" not in pattern:
        return [pattern]
    try:  # imported here: a folder data set, or a box installed with --no-deps, never needs it
        from braceexpand import braceexpand
    except ImportError as e:
        raise ValueError(f"the shard pattern {printable(pattern)} needs braceexpand (pip install braceexpand)") from e
    return list(braceexpand(pattern))


def check_bytes(head: bytes, tail: bytes, total: int, min_size: int) -> tuple[str | None, tuple | None, str]:
    """Header + tail check -> (problem or None, (width, height) or None, mode). No pixel decoding."""
    try:
        with Image.open(io.BytesIO(head)) as im:
            fmt, size, mode = im.format, im.size, im.mode
    except Exception as e:  # PIL raises many types for garbage; all mean "not an image we can read"
        return f"not an image ({type(e).__name__})", None, ""
    t = tail.rstrip(b"\x00\r\n ")
    if fmt == "JPEG" and not t.endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)", size, mode
    if fmt == "PNG" and b"IEND" not in tail[-12:]:
        return "truncated PNG (no IEND chunk)", size, mode
    if min(size) < min_size:
        return f"too small ({size[0]}x{size[1]} < {min_size} px)", size, mode
    return None, size, mode


def _check_region(fd: int, offset: int, total: int, min_size: int) -> tuple[str | None, tuple | None, str]:
    """Check the ``total`` bytes at ``offset`` of an open file (a whole file, or a tar member), reading a
    bounded head and tail only (a multi-GB file costs the same as a small one)."""
    head = os.pread(fd, min(total, _HEAD_BYTES), offset)
    tail = os.pread(fd, min(total, _TAIL_BYTES), offset + max(0, total - _TAIL_BYTES))
    problem, size, mode = check_bytes(head, tail, total, min_size)
    if problem is not None and problem.startswith("not an image") and total > len(head) and head.startswith(b"\xff\xd8\xff"):
        problem, size, mode = check_bytes(os.pread(fd, min(total, _MAX_HEADER_BYTES), offset), tail, total, min_size)
    if problem is not None and problem.startswith("truncated"):
        # Files without an end marker may carry a trailer after it (some cameras append data).
        if total <= _MAX_CONFIRM_BYTES:
            try:
                with Image.open(io.BytesIO(os.pread(fd, total, offset))) as im:
                    im.load()
                problem = None
            except Exception:  # any decode failure confirms the truncation
                pass
        else:
            marker = b"\xff\xd9" if problem.startswith("truncated JPEG") else b"IEND"
            n = min(total, _TRAILER_SEARCH)
            if marker in os.pread(fd, n, offset + total - n):
                problem = None
    return problem, size, mode


def _check_file(path: str, min_size: int) -> tuple[str | None, tuple | None, str]:
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if total == 0:
                return "empty file", None, ""
            return _check_region(f.fileno(), 0, total, min_size)
    except OSError as e:
        return f"unreadable ({e.strerror})", None, ""


def _note_for(path: str, mode: str, size, crop: int | None) -> str | None:
    notes = []
    if mode not in ("RGB",):
        notes.append(f"mode {mode} -> RGB")
    if crop is not None and size is not None and min(size) < crop:
        notes.append(f"smaller than the {crop} px crop, upsampled ({size[0]}x{size[1]})")
    return "; ".join(notes) or None


def _index_path(cache_dir: str | os.PathLike, root: Path, min_size: int) -> Path:
    key = hashlib.sha1(f"{root.resolve()}|{min_size}|{_INDEX_VERSION}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"scan-{key}.json"


def _load_index(path: Path, root: Path, min_size: int) -> dict[str, tuple[tuple[int, int], tuple]]:
    """A previous scan of ``root`` as {path: ((size, mtime_ns), (problem, (w, h) or None, mode))}.

    JSON, never pickle: anyone who can write to a shared cache directory must not be able to run code
    in every trainer. The file is checked against the data it describes (format version, root,
    min_size, entry count, field types); a missing, malformed or foreign index is ignored (with a
    warning unless absent) and the scan rebuilds it. Each entry is reused only while its file's
    size and mtime are unchanged."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION:
            raise ValueError("unknown format")
        if data.get("root") != str(root.resolve()) or data.get("min_size") != min_size:
            raise ValueError(f"written for {data.get('root')!r} with min_size {data.get('min_size')!r}")
        entries = data["entries"]
        if not isinstance(entries, dict) or data.get("count") != len(entries):
            raise ValueError("entry count mismatch")
        out = {}
        for name, (size, mtime, problem, wh, mode) in entries.items():
            ok = (
                isinstance(size, int)
                and isinstance(mtime, int)
                and (problem is None or isinstance(problem, str))
                and (wh is None or (isinstance(wh, list) and len(wh) == 2 and all(isinstance(v, int) and v > 0 for v in wh)))
                and isinstance(mode, str)
                and (problem is not None or wh is not None)
            )
            if not ok:
                raise ValueError(f"malformed entry for {name!r}")
            out[name] = ((size, mtime), (problem, tuple(wh) if wh is not None else None, mode))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the scan index %s (%s); rescanning", printable(path), printable(e))
        return {}


def _save_index(path: Path, root: Path, min_size: int, entries: dict) -> None:
    """Atomic (temp file + rename): ranks scanning the same data at once never read a partial index."""
    data = {
        "version": _INDEX_VERSION,
        "root": str(root.resolve()),
        "min_size": min_size,
        "count": len(entries),
        "entries": {f: [sig[0], sig[1], res[0], list(res[1]) if res[1] else None, res[2]] for f, (sig, res) in entries.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache location only costs the next run a rescan
        log.warning("could not write the scan index %s: %s", printable(path), printable(e))


def _scan_folder(
    root: Path,
    min_size: int,
    threads: int,
    crop: int | None,
    cache_dir: str | os.PathLike | None = None,
    classes: list[str] | None = None,
) -> Source:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is not None and not class_dirs:
        # A flat split (ROOT/val/*.jpg) beside a class-folder train/: its images have no label (-1); the held-out
        # pretraining loss needs none, and require_labels makes it an error for evaluation.
        classes, groups = list(classes), [(-1, root)]
    elif classes is not None:
        known = {c: i for i, c in enumerate(classes)}
        unknown = [d.name for d in class_dirs if d.name not in known]
        if unknown:
            what = f"class folder(s) {printable(unknown[:3])}" if unknown else "no class folder"
            raise ValueError(f"{printable(root)}: {what} not among the {len(classes)} given classes")
        classes = list(classes)
        groups = [(known[d.name], d) for d in class_dirs]
    elif class_dirs:
        classes = [d.name for d in class_dirs]
        groups = [(ci, d) for ci, d in enumerate(class_dirs)]
    else:
        classes = [root.name]
        groups = [(0, root)]
    entries, bad, empty = [], [], []
    for ci, d in groups:
        files = sorted(str(p) for p in d.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-2:]))
        if not files and ci >= 0:
            empty.append(classes[ci])
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                entries.append((ci, f))
            else:
                bad.append((f, "not an image (extension)"))
    if cache_dir is None:
        with ThreadPoolExecutor(max(1, threads)) as ex:
            results = list(ex.map(lambda e: _check_file(e[1], min_size), entries))
    else:
        # Reuse the previous scan for files whose (size, mtime) did not change; check only the rest.
        ipath = _index_path(cache_dir, root, min_size)
        old = _load_index(ipath, root, min_size)
        sigs = []
        for _, f in entries:
            st = os.stat(f)
            sigs.append((st.st_size, st.st_mtime_ns))
        todo = [k for k, (_, f) in enumerate(entries) if old.get(f, (None,))[0] != sigs[k]]
        with ThreadPoolExecutor(max(1, threads)) as ex:
            fresh = dict(zip(todo, ex.map(lambda k: _check_file(entries[k][1], min_size), todo), strict=True))
        results = [fresh[k] if k in fresh else old[f][1] for k, (_, f) in enumerate(entries)]
        if todo or len(old) != len(entries):
            _save_index(ipath, root, min_size, {f: (sigs[k], results[k]) for k, (_, f) in enumerate(entries)})
    src = Source("folder", str(root), [], [], [], [], classes, bad, [], empty)
    for (ci, f), (problem, size, mode) in zip(entries, results, strict=True):
        if problem is not None:
            src.bad.append((f, problem))
            continue
        src.locs.append(f)
        src.labels.append(ci)
        src.sizes.append(size)
        src.names.append(f)
        note = _note_for(f, mode, size, crop)
        if note:
            src.notes.append((f, note))
    return src


def _scan_tars(spec: str, tars: list[str], min_size: int, crop: int | None, classes: list[str] | None = None) -> Source:
    src = Source("tar", spec, [], [], [], [], [])
    raw_labels: list[int] = []
    for tp in tars:
        samples: dict[str, dict] = {}
        order: list[str] = []
        try:
            with tarfile.open(tp, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    dirn = os.path.dirname(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{dirn}/{stem}" if dirn else stem
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext.lower()] = m
        except (tarfile.TarError, OSError) as e:
            src.bad.append((tp, f"unreadable tar ({type(e).__name__})"))
            continue
        with open(tp, "rb") as f:
            fd = f.fileno()
            for key in order:
                members = samples[key]
                name = f"{tp}:{key}"
                img_ext = next((e for e in members if "." + e in IMAGE_EXTENSIONS), None)
                if img_ext is None:
                    src.bad.append((name, "no image member (" + ",".join(sorted(members)) + ")"))
                    continue
                m = members[img_ext]
                if m.size == 0:
                    problem, size, mode = "empty file", None, ""
                else:
                    problem, size, mode = _check_region(fd, m.offset_data, m.size, min_size)
                label = -1
                if "cls" in members and members["cls"].size > _MAX_CLS_BYTES:
                    problem = problem or f".cls member of {members['cls'].size} bytes (a label is a short integer)"
                elif "cls" in members:
                    txt = os.pread(fd, members["cls"].size, members["cls"].offset_data).strip()
                    try:
                        label = int(txt)
                    except ValueError:
                        problem = problem or f"bad .cls content {txt[:20]!r}"
                if problem is not None:
                    src.bad.append((name + "." + img_ext, problem))
                    continue
                src.locs.append((tp, m.offset_data, m.size))
                raw_labels.append(label)
                src.sizes.append(size)
                src.names.append(name + "." + img_ext)
                note = _note_for(name, mode, size, crop)
                if note:
                    src.notes.append((name, note))
    # Labels are the .cls integers; classes "0" .. str(max label) (or the given names, one per label).
    top = max(raw_labels, default=-1)
    if classes is not None and top >= len(classes):
        raise ValueError(f"{printable(spec)}: label {top} in the shards, but only {len(classes)} classes were given")
    src.classes = list(classes) if classes is not None else [str(c) for c in range(top + 1)]
    src.labels = raw_labels
    return src


def split_classes(root_or_spec: str | os.PathLike) -> list[str] | None:
    """The class names of a ``ROOT/{train,val}/<class>/`` tree: the sorted union of both splits' class
    folders, so a class id names the same class in both splits even when one split lacks a folder.
    None for any other layout (a single class-folder tree numbers its own sorted folder names)."""
    p = Path(os.fspath(root_or_spec))
    if not p.is_dir():
        return None
    names: set[str] = set()
    for split in ("train", "val"):
        d = p / split
        if d.is_dir():
            names.update(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    return sorted(names) or None


def resolve_spec(root_or_spec: str | os.PathLike, split: str) -> tuple[str, Path | list[str]]:
    """-> ("folder", dir) or ("tar", [tar paths]); raises before any scanning if nothing matches."""
    spec = os.fspath(root_or_spec)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    p = Path(spec)
    if p.is_dir():
        sub = p / split
        if sub.is_dir():
            p = sub
        elif split == "val" and (p / "train").is_dir():
            raise FileNotFoundError(f"dataset {printable(spec)} has a train/ split but no val/ split")
        tars = sorted(str(t) for t in p.glob("*.tar"))
        has_dirs = any(d.is_dir() for d in p.iterdir())
        if tars and not has_dirs:
            return "tar", tars
        if not any(p.iterdir()):
            raise ValueError(f"dataset directory is empty: {printable(p)}")
        return "folder", p
    if any(ch in spec for ch in "{*?["):
        paths = sorted({q for pat in expand_braces(spec) for q in glob.glob(pat)})
        if not paths:
            raise FileNotFoundError(f"shard pattern matches no files: {printable(spec)}")
        missing = [q for q in expand_braces(spec) if not any(c in q for c in "*?[") and not os.path.exists(q)]
        if missing:
            first = printable(missing[0])
            raise FileNotFoundError(f"shard pattern {printable(spec)}: {len(missing)} shard(s) missing, e.g. {first}")
        return "tar", paths
    if p.is_file() and spec.endswith(".tar"):
        return "tar", [spec]
    raise FileNotFoundError(f"dataset not found: {printable(spec)} (expected a directory or a .tar shard pattern)")


def has_split(root_or_spec: str | os.PathLike, split: str) -> bool:
    """Whether the data set has its own ``split`` folder (``ROOT/val/``); tar shards have no splits."""
    p = Path(os.fspath(root_or_spec))
    if (p / "pack.json").is_file():
        from .pack import pack_splits

        return split in pack_splits(p)
    return (p / split).is_dir()


def holdout(src: Source, fraction: float, seed: int, split: str) -> Source:
    """A fixed held-out part of ``src`` (``split="val"``) or the rest (``"train"``), for data with no val split.

    A file is held out when a seeded hash of its name falls below ``fraction``: the choice does not
    depend on file order or on which other files exist, so adding files never moves one across.
    """
    def held(name: str) -> bool:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < fraction

    keep = [i for i, name in enumerate(src.names) if held(name) == (split == "val")]
    if not keep:
        raise ValueError(f"{src.root}: holding out {fraction:.0%} of {len(src)} files leaves no {split} images; "
                         f"add a val/ split or change holdout_fraction")
    pick = lambda xs: [xs[i] for i in keep]
    return dataclasses.replace(src, locs=pick(src.locs), labels=pick(src.labels), sizes=pick(src.sizes),
                               names=pick(src.names))


def _scan(root_or_spec, split: str, min_size: int, threads: int, crop: int | None, index_cache, classes) -> Source:
    kind, where = resolve_spec(root_or_spec, split)
    if kind == "folder":
        return _scan_folder(where, min_size, threads, crop, index_cache, classes or split_classes(root_or_spec))
    return _scan_tars(os.fspath(root_or_spec), where, min_size, crop, classes)


def _source_to_json(src: Source) -> dict:
    return dataclasses.asdict(src)


def _source_from_json(data: dict) -> Source:
    """Inverse of :func:`_source_to_json` (JSON has lists where the table holds tuples)."""
    tup = lambda xs: [tuple(x) for x in xs]
    locs = [loc if isinstance(loc, str) else tuple(loc) for loc in data["locs"]]
    return Source(data["kind"], data["root"], locs, list(data["labels"]), tup(data["sizes"]), list(data["names"]),
                  list(data["classes"]), tup(data["bad"]), tup(data["notes"]), list(data["empty_classes"]))


def _scan_on_rank0(scan) -> Source:
    """Rank 0 runs ``scan`` and broadcasts its result (or its error) as JSON bytes; never pickle between ranks."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    payload, err = b"", None
    if dist.get_rank() == 0:
        try:
            payload = json.dumps({"source": _source_to_json(scan())}).encode()
        except (ValueError, FileNotFoundError) as e:  # the other ranks must hear about it, not wait forever
            err = e
            payload = json.dumps({"error": str(e), "type": type(e).__name__}).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if payload else \
        torch.empty(int(size.item()), dtype=torch.uint8, device=device)  # deliberate sync: start-up, once
    dist.broadcast(buf, 0)
    if err is not None:
        raise err
    data = json.loads(bytes(buf.cpu().numpy()).decode())
    if "error" in data:
        raise (FileNotFoundError if data["type"] == "FileNotFoundError" else ValueError)(data["error"])
    return _source_from_json(data["source"])


def open_source(
    root_or_spec: str | os.PathLike,
    split: str = "train",
    *,
    min_size: int = 8,
    threads: int = 8,
    crop: int | None = None,
    warn: bool = True,
    index_cache: str | os.PathLike | None = None,
    classes: list[str] | None = None,
    require_labels: bool = False,
    shared: bool = False,
) -> Source:
    """Scan a folder or tar shards into a clean :class:`Source`; raises if no usable sample remains.

    ``shared=True`` (every rank of the initialized process group calls this together, e.g. for a rank-sharded
    loader): rank 0 scans (or reuses its ``index_cache``) and broadcasts the table as JSON, so a job of N ranks
    reads the file system's metadata once, not N times.

    Class ids: folders number their class-folder names in sorted order; in a ``ROOT/{train,val}``
    tree, the sorted union of both splits' folder names (:func:`split_classes`), so ids agree across
    splits. ``classes`` pins the names (and order) instead, e.g. a train set's ``classes`` for a
    validation set given separately; folders outside it are an error. Tar shards take the integer in
    each sample's ``.cls`` member (``-1`` when absent; ``require_labels=True`` makes that an error).
    ``index_cache``: a directory where folder scans are kept; later scans re-check only files whose
    size or mtime changed (the directory walk itself still runs, so added/removed files are seen)."""
    if Path(os.fspath(root_or_spec), "pack.json").is_file():  # `fastmae data pack` output: the index is the table
        from .pack import open_pack

        src = open_pack(root_or_spec, split, classes)
    elif shared:
        src = _scan_on_rank0(lambda: _scan(root_or_spec, split, min_size, threads, crop, index_cache, classes))
    else:
        src = _scan(root_or_spec, split, min_size, threads, crop, index_cache, classes)
    if len(src) == 0:
        why = f"; {len(src.bad)} bad file(s), e.g. {printable(src.bad[0][0])}: {printable(src.bad[0][1])}" if src.bad else ""
        raise ValueError(f"no usable images in {printable(root_or_spec)} (split {split!r}){why}")
    unlabeled = [n for n, lb in zip(src.names, src.labels, strict=True) if lb < 0]
    if require_labels and unlabeled:
        first = printable(unlabeled[0])
        why = ".cls label" if src.kind == "tar" else "class folder (a flat folder has no labels)"
        raise ValueError(f"{len(unlabeled)} sample(s) in {printable(root_or_spec)} have no {why}, e.g. {first}")
    if warn and (src.bad or src.empty_classes):
        first = "; ".join(f"{printable(p)}: {printable(r)}" for p, r in src.bad[:3])
        empty = ", ".join(printable(c) for c in src.empty_classes[:5])
        log.warning(
            "skipping %d bad file(s) in %s (%s)%s",
            len(src.bad),
            printable(src.root),
            first or "none",
            f"; empty class folders: {empty}" if src.empty_classes else "",
        )
    return src
