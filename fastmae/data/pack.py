"""``fastmae data pack SRC DST``: a data set as webdataset shards of JPEGs at a bounded short side, with a JSON index.

SRC is anything the loaders read (a class-folder tree, ``ROOT/{train,val}``, tar shards). DST gets
``<split>-NNNNNN.tar`` shards (members ``<key>.jpg`` and ``<key>.cls``) and ``pack.json``: the count,
classes, every shard's sample offsets, sizes and labels, the packing settings and a checksum of the
source bytes. Loaders given DST read ``pack.json`` and start without scanning (:func:`open_pack`).

Why short side 256 by default: the MAE recipe's crops cover 20-100 % of the image area and are resized
to 224 px. A stored short side of 256 is what the evaluation path resizes to (224 / 0.875), so eval loses
nothing, and a random-resized crop keeps >= 224 source px per side whenever it covers >= ~57 % of a 4:3
image (about half of the 0.2-1 draws; the rest are upsampled from 132-224 px, versus 193-224 px from a
500 x 375 original). Decode cost scales with pixels: 256 x 341 is 0.47x of 500 x 375. ``--short_side=320``
keeps 79 % of draws at full detail for 0.73x the pixels. Images already within the bound and stored as
RGB or grayscale JPEGs are copied byte for byte (no second lossy generation).

Work is split into shards, each written by one worker process to a temporary name and renamed with a
sidecar listing its samples: a killed pack restarts where it stopped (finished shards are kept), a DST
holding a pack of other data or settings is refused, and inputs that fail to decode are reported and
left out (so are those the loaders' scan rejects).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from fastmae.flags import run_cli

from .image_io import MAX_PIXELS
from .sources import Source, open_source
from .text import printable

INDEX = "pack.json"
FORMAT = "fastmae-pack"
VERSION = 1

__all__ = ["PackConfig", "pack", "open_pack", "pack_splits", "is_pack", "main"]


@dataclass
class PackConfig:
    positional: ClassVar[tuple[str, ...]] = ("src", "dst")  # `fastmae data pack SRC DST`
    src: str = field(default="", metadata={"help": "class-folder tree or tar shard pattern to pack (first argument)"})
    dst: str = field(default="", metadata={"help": "output folder for the shards and pack.json (second argument)"})
    short_side: int = field(default=256, metadata={"help": "images with a longer short side are resized down to it"})
    quality: int = field(default=90, metadata={"help": "JPEG quality of re-encoded images"})
    shard_size: int = field(default=1000, metadata={"help": "samples per shard"})
    workers: int = field(default=0, metadata={"help": "worker processes; 0 = the cores of this machine"})

    def validate(self) -> None:
        if not self.src or not self.dst:
            raise ValueError("give the source and the destination: fastmae data pack SRC DST")
        for name, lo, hi in (("short_side", 16, 1 << 14), ("quality", 1, 100), ("shard_size", 1, 1 << 20)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


def is_pack(root_or_spec) -> bool:
    return Path(os.fspath(root_or_spec), INDEX).is_file()


def _splits(src: str) -> list[str]:
    p = Path(src)
    if p.is_dir() and not is_pack(p) and any((p / s).is_dir() for s in ("train", "val")):
        return [s for s in ("train", "val") if (p / s).is_dir()]
    return ["train"]


def _plan_key(cfg: PackConfig, sources: dict[str, Source]) -> str:
    """What the pack is made of: settings + every split's sample names, labels and byte sizes (no reads)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([cfg.short_side, cfg.quality, cfg.shard_size, VERSION]).encode())
    for split, src in sources.items():
        h.update(split.encode())
        h.update(json.dumps(src.classes).encode())
        for name, label, loc in zip(src.names, src.labels, src.locs, strict=True):
            size = loc[2] if isinstance(loc, tuple) else os.stat(loc).st_size
            h.update(f"{name}\0{label}\0{size}\n".encode())
    return h.hexdigest()


def _encode(data: bytes, short_side: int, quality: int) -> tuple[bytes, int, int]:
    """Source bytes -> (JPEG bytes, width, height) with min(width, height) <= short_side."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} pixels is more than the limit of {MAX_PIXELS}")
        scale = short_side / min(w, h)
        if scale >= 1 and im.format == "JPEG" and im.mode in ("RGB", "L"):
            im.load()  # a full decode: a file that passed the header scan may still be corrupt
            return data, w, h
        tw, th = (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 0.5 and im.format == "JPEG":
            im.draft("RGB", (2 * tw, 2 * th))  # DCT-scale to >= 2x the target: the bicubic does the last 2x+
        im.load()
        rgb = im.convert("RGB") if im.mode not in ("RGB", "L") else im
        if (tw, th) != rgb.size:
            rgb = rgb.resize((tw, th), Image.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=quality)
        return out.getvalue(), tw, th


def _write_shard(job: dict) -> dict:
    """One shard: encode its samples, write ``<file>.tmp``, rename, then the sidecar (the shard's done mark)."""
    path = Path(job["path"])
    samples, bad, digests = [], [], []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, name, loc, label in job["items"]:
            try:
                data = Source("", "", [loc], [label], [(0, 0)], [name], []).read_bytes(0)
                digests.append(hashlib.blake2b(data, digest_size=16).hexdigest())
                jpg, w, h = _encode(data, job["short_side"], job["quality"])
            except Exception as e:  # any unreadable or undecodable input is reported and left out
                bad.append([name, f"decode failed ({type(e).__name__}: {str(e)[:80]})"])
                continue
            for ext, payload in (("jpg", jpg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tf.addfile(info, io.BytesIO(payload))
            samples.append([key, name, w, h, label])
    offsets = {}
    with tarfile.open(tmp, "r:") as tf:
        for m in tf:
            offsets[m.name] = (m.offset_data, m.size)
    rows = [[*offsets[f"{key}.jpg"], w, h, label, name] for key, name, w, h, label in samples]
    os.replace(tmp, path)
    side = {"file": path.name, "count": len(rows), "samples": rows, "bad": bad, "digests": digests}
    sidecar = path.with_suffix(".json")
    tmp_side = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp_side.write_text(json.dumps(side))
    os.replace(tmp_side, sidecar)
    return side


def _shard_jobs(cfg: PackConfig, dst: Path, split: str, src: Source) -> list[dict]:
    jobs = []
    for s, lo in enumerate(range(0, len(src), cfg.shard_size)):
        ids = range(lo, min(len(src), lo + cfg.shard_size))
        items = [(f"{split}{i:09d}", src.names[i], src.locs[i], src.labels[i]) for i in ids]
        jobs.append({"path": str(dst / f"{split}-{s:06d}.tar"), "items": items, "short_side": cfg.short_side,
                     "quality": cfg.quality})
    return jobs


def _check_dst(dst: Path, key: str) -> dict | None:
    """The finished index when DST already holds this very pack; raises when it holds another."""
    for name in (INDEX, ".pack-plan.json"):
        p = dst / name
        if p.is_file():
            try:
                old = json.loads(p.read_text())
            except ValueError:
                old = {}
            if old.get("plan") != key:
                raise ValueError(f"{printable(dst)} holds a different pack (other data or settings); "
                                 "pick an empty folder or remove it")
            return old if name == INDEX else None
    if dst.exists() and any(p for p in dst.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"{printable(dst)} is not empty and holds no pack; pick an empty folder")
    return None


def pack(cfg: PackConfig, log=print) -> dict:
    """Pack ``cfg.src`` into ``cfg.dst``; returns the index. Resumes a killed pack of the same plan."""
    cfg.validate()
    sources = {s: open_source(cfg.src, s, warn=False) for s in _splits(cfg.src)}
    classes = next(iter(sources.values())).classes
    key = _plan_key(cfg, sources)
    dst = Path(cfg.dst)
    done = _check_dst(dst, key)
    if done is not None:
        log(f"{printable(dst)} already holds this pack ({sum(s['count'] for s in done['splits'].values())} samples)")
        return done
    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob(".*.tmp"):  # half-written shards of a killed pack; their shards are redone below
        stale.unlink()
    (dst / ".pack-plan.json").write_text(json.dumps({"plan": key, "src": os.fspath(cfg.src)}))
    jobs = {s: _shard_jobs(cfg, dst, s, src) for s, src in sources.items()}
    todo = [j for js in jobs.values() for j in js if not Path(j["path"]).with_suffix(".json").is_file()]
    n_jobs = sum(map(len, jobs.values()))
    if len(todo) < n_jobs:
        log(f"resuming: {n_jobs - len(todo)} of {n_jobs} shard(s) already written")
    workers = cfg.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(min(workers, max(1, len(todo)))) as ex:
        for side in ex.map(_write_shard, todo):
            log(f"  {side['file']}: {side['count']} samples" + (f", {len(side['bad'])} bad" if side["bad"] else ""))
    index = _assemble(cfg, dst, key, sources, jobs, classes)
    tmp = dst / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, dst / INDEX)
    (dst / ".pack-plan.json").unlink(missing_ok=True)
    for js in jobs.values():
        for j in js:
            Path(j["path"]).with_suffix(".json").unlink(missing_ok=True)
    return index


def _assemble(cfg: PackConfig, dst: Path, key: str, sources: dict, jobs: dict, classes: list[str]) -> dict:
    checksum = hashlib.blake2b(digest_size=16)
    splits, bad = {}, []
    for split, src in sources.items():
        bad += [[n, r] for n, r in src.bad]
        shards = []
        for j in jobs[split]:
            side = json.loads(Path(j["path"]).with_suffix(".json").read_text())
            bad += side["bad"]
            for d in side["digests"]:
                checksum.update(d.encode())
            shards.append({"file": side["file"], "count": side["count"], "samples": side["samples"]})
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    return {"format": FORMAT, "version": VERSION, "plan": key, "source": os.fspath(cfg.src),
            "source_checksum": checksum.hexdigest(), "short_side": cfg.short_side, "quality": cfg.quality,
            "classes": classes, "splits": splits, "bad": bad}


def pack_splits(root: str | os.PathLike) -> list[str]:
    try:
        return sorted(json.loads(Path(os.fspath(root), INDEX).read_text()).get("splits", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _pin_classes(src: Source, classes: list[str], root: Path) -> None:
    """Renumber a pack's labels to pinned class names (as the folder scan does); unlabeled samples stay -1."""
    known = {c: i for i, c in enumerate(classes)}
    unknown = sorted({src.classes[lb] for lb in src.labels if lb >= 0} - set(known))
    if unknown:
        raise ValueError(f"{printable(root)}: pack class(es) {printable(unknown[:3])} not among the {len(classes)} "
                         f"given classes")
    ids = [known.get(c, -1) for c in src.classes]
    src.labels = [ids[lb] if lb >= 0 else lb for lb in src.labels]
    src.classes = list(classes)


def open_pack(root: str | os.PathLike, split: str, classes: list[str] | None = None) -> Source:
    """A pack's sample table from its index alone: no directory walk, no header reads. ``classes`` pins the class
    names (and order) as for folders: labels are renumbered to it, and a pack class outside it is an error."""
    root = Path(os.fspath(root))
    try:
        index = json.loads((root / INDEX).read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError("not a fastmae pack of this version")
        part = index["splits"].get(split)
        if part is None:
            raise FileNotFoundError(f"pack {printable(root)} has no {split!r} split (has {sorted(index['splits'])})")
        src = Source("tar", str(root), [], [], [], [], list(index["classes"]))
        for shard in part["shards"]:
            path = str(root / shard["file"])
            for offset, size, w, h, label, name in shard["samples"]:
                src.locs.append((path, int(offset), int(size)))
                src.labels.append(int(label))
                src.sizes.append((int(w), int(h)))
                src.names.append(f"{path}:{name}")
        if any(not -1 <= lb < len(src.classes) for lb in src.labels):
            raise ValueError(f"a label outside the {len(src.classes)} classes")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read the pack index {printable(root / INDEX)}: {printable(e)}") from None
    if classes is not None:
        _pin_classes(src, classes, root)
    return src


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, PackConfig, {}, _pack_and_report, "data pack", __doc__,
                   usage="usage: fastmae data pack SRC DST [--key=value ...]")


def _pack_and_report(cfg: PackConfig) -> int:
    index = pack(cfg)
    counts = ", ".join(f"{s} {p['count']}" for s, p in index["splits"].items())
    print(f"packed {counts} samples into {printable(cfg.dst)} ({len(index['classes'])} classes, short side "
          f"{index['short_side']}, quality {index['quality']}); index {INDEX}")
    for name, why in index["bad"][:10]:
        print(f"  NOT PACKED {printable(name)}: {printable(why)}")
    if len(index["bad"]) > 10:
        print(f"  ... and {len(index['bad']) - 10} more input(s) not packed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
