"""Small generated image sets for the data tests (no data is committed)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee()]


def write_folder(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """root/<class>/<k>.jpg: random crops (40..96 px) of three real photos, JPEG q90."""
    rng = np.random.default_rng(seed)
    for ci, img in enumerate(photos()):
        d = root / f"class{ci}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = img.shape[:2]
        for k in range(per_class):
            cw, ch = (int(v) for v in rng.integers(40, 97, size=2))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            Image.fromarray(img[y : y + ch, x : x + cw]).save(d / f"{k:03d}.jpg", quality=90)
    return root


def write_tars(folder: Path, out: Path, shards: int) -> list[Path]:
    """Write folder's images (in the folder source's order) into ``shards`` webdataset tars."""
    files = sorted(p for p in folder.rglob("*.jpg"))
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(files) // shards)
    for s in range(shards):
        tp = out / f"train-{s:06d}.tar"
        with tarfile.open(tp, "w") as tf:
            for k, f in enumerate(files[s * per : (s + 1) * per]):
                key = f"s{s}_{k:05d}"
                for ext, data in (("jpg", f.read_bytes()), ("cls", str(classes.index(f.parent.name)).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(tp)
    return paths


def corrupt_png_bytes(img: np.ndarray) -> bytes:
    """A PNG whose header and IEND are intact but whose compressed pixel data is zeroed: passes the
    cheap scan, fails to decode in both PIL and DALI."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    b = buf.getvalue()
    i = b.find(b"IDAT") + 14
    return b[:i] + bytes(200) + b[i + 200 :]


def write_bad_folder(root: Path) -> dict[str, str]:
    """A folder with every kind of awkward input. -> {file name: expected kind}."""
    good = write_folder(root, per_class=6, seed=1)
    img = photos()[0][:80, :100]
    d = good / "class0"
    ok = io.BytesIO()
    Image.fromarray(img).save(ok, format="JPEG", quality=90)
    kinds = {}
    (d / "truncated.jpg").write_bytes(ok.getvalue()[: len(ok.getvalue()) // 2])
    kinds["truncated.jpg"] = "bad"
    (d / "notes.txt").write_text("not an image")
    kinds["notes.txt"] = "bad"
    (d / "fake.jpg").write_bytes(b"<html>404</html>")
    kinds["fake.jpg"] = "bad"
    Image.fromarray(img[:3, :3]).save(d / "tiny.jpg")
    kinds["tiny.jpg"] = "bad"
    (d / "corrupt.png").write_bytes(corrupt_png_bytes(img))
    kinds["corrupt.png"] = "runtime"
    Image.fromarray(img).save(d / "photo.png")
    Image.fromarray(img).convert("L").save(d / "gray.jpg", quality=90)
    Image.fromarray(img).convert("CMYK").save(d / "cmyk.jpg", quality=90)
    Image.fromarray(img).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(img[:20, :24]).save(d / "small.jpg", quality=90)  # smaller than the crop: upsampled
    for name in ("photo.png", "gray.jpg", "cmyk.jpg", "rgba.png", "small.jpg"):
        kinds[name] = "ok"
    (good / "empty_class").mkdir()
    return kinds
