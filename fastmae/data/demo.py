"""A small real-photo ImageFolder built offline from images that ship inside installed packages.

Classes are source photos (scikit-image's bundled samples, scikit-learn's ``load_sample_images``,
matplotlib's ``grace_hopper.jpg``). Each photo is split into a train region (left 70 %) and a held-out
strip (right 30 %); train crops come only from the first, val crops only from the second, so the two
splits share no pixels. Crops are 64..256 px with aspect ratio in (3/4, 4/3), saved as JPEG q90.
The build is deterministic, takes about a second, and is atomic: it is written to a temporary folder
that is renamed into place, so concurrent callers either find the finished set or race harmlessly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_VERSION = 1
TRAIN_PER_CLASS = 32
VAL_PER_CLASS = 6
_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def sample_photos() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3). Only sources present in this install are used (all are bundled)."""
    out: dict[str, np.ndarray] = {}
    try:
        from skimage import data as skd

        for name in _SKIMAGE:
            try:
                out[name] = getattr(skd, name)()
            except Exception:  # an image fetched on demand (not bundled) is skipped offline
                continue
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        ds = load_sample_images()
        for fname, img in zip(ds.filenames, ds.images, strict=True):
            out[Path(fname).stem] = img
    except ImportError:
        pass
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except (ImportError, OSError):
        pass
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in out.items() if v.ndim == 3}


def _crops(rng: np.random.Generator, img: np.ndarray, count: int, lo: int, hi: int):
    h, w = img.shape[:2]
    for _ in range(count):
        side = int(rng.integers(lo, hi + 1))
        ar = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(8, round(side * np.sqrt(ar)))))
        ch = int(min(h, max(8, round(side / np.sqrt(ar)))))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        yield img[y : y + ch, x : x + cw]


def _build(dst: Path) -> None:
    photos = sample_photos()
    if len(photos) < 2:
        raise RuntimeError("demo dataset needs scikit-image or scikit-learn sample images (pip install 'fastmae[dev]')")
    rng = np.random.default_rng(20251122)
    for name in sorted(photos):
        img = photos[name]
        w = img.shape[1]
        cut = int(w * 0.7)
        for split, region, count, lo in (
            ("train", img[:, :cut], TRAIN_PER_CLASS, 64),
            ("val", img[:, cut:], VAL_PER_CLASS, 48),
        ):
            d = dst / split / name
            d.mkdir(parents=True, exist_ok=True)
            hi = min(256, *region.shape[:2])
            for k, crop in enumerate(_crops(rng, region, count, min(lo, hi), hi)):
                Image.fromarray(crop).save(d / f"{name}_{k:03d}.jpg", quality=90)


def demo_cache_dir() -> Path:
    """Where the image and video demo sets are built: ``$FASTMAE_CACHE``, else ``~/.cache/fastmae``."""
    env = os.environ.get("FASTMAE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastmae"


def prepare_demo_dataset(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the demo ImageFolder root with ``train/`` and ``val/`` splits.

    ``cache_dir`` defaults to ``demo_cache_dir() / "demo"``."""
    base = Path(cache_dir) if cache_dir is not None else demo_cache_dir() / "demo"
    root = base / f"demo-v{DEMO_VERSION}"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=base))
    try:
        _build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "train").is_dir():  # lost a race only if someone else finished; else real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
