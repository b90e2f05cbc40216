"""The embedded clip demo, built offline: VP9 pans and zooms over scikit-image's bundled photos.

One class per photo; ``train/`` and ``val/`` clips are separate random camera moves. Built once into
``demo_cache_dir() / "video_demo_v1"``, written to a temporary folder then renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .video import require_av

__all__ = ["encode_video", "prepare_video_demo"]

DEMO_VERSION = 1
_DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def encode_video(path: str | os.PathLike, frames: np.ndarray, codec: str = "vp9", fps: int = 25, crf: int = 10) -> Path:
    """uint8 (T, H, W, 3) RGB -> a VP9/VP8 WebM, MJPEG AVI or H.264 MP4 file at ``path`` (via PyAV)."""
    av = require_av()
    lib = {"vp9": "libvpx-vp9", "vp8": "libvpx", "mjpeg": "mjpeg", "h264": "libx264"}
    if codec not in lib:
        raise ValueError(f"codec must be one of {sorted(lib)}, got {codec!r}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    with av.open(str(path), "w") as out:
        st = out.add_stream(lib[codec], rate=fps)
        st.width, st.height = frames.shape[2], frames.shape[1]
        if codec == "mjpeg":
            st.pix_fmt = "yuvj420p"
            st.options = {"q:v": "2"}
        else:
            st.pix_fmt = "yuv420p"
            st.options = {"crf": str(crf)}
            if codec != "h264":
                st.options = {"crf": str(crf), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def _pan_zoom(img: np.ndarray, rng: np.random.Generator, n_frames: int, size: int) -> np.ndarray:
    """A smooth camera move over a photo: a square window sliding and zooming linearly, resized to ``size``."""
    from PIL import Image

    photo = Image.fromarray(img)
    # Shrink the photo once so every window is at most ~2.5x the frame: cheap per-frame resizes.
    factor = 2.5 * size / min(photo.size)
    if factor < 1:
        photo = photo.resize((round(photo.width * factor), round(photo.height * factor)), Image.BILINEAR, reducing_gap=2.0)
    W, H = photo.size
    short = min(H, W)
    s0, s1 = (int(short * rng.uniform(0.35, 0.9)) for _ in range(2))
    ends = [(int(rng.integers(0, W - s + 1)), int(rng.integers(0, H - s + 1))) for s in (s0, s1)]
    out = []
    for f in range(n_frames):
        a = f / max(n_frames - 1, 1)
        s = int(round(s0 + a * (s1 - s0)))
        x = min(int(round(ends[0][0] + a * (ends[1][0] - ends[0][0]))), W - s)
        y = min(int(round(ends[0][1] + a * (ends[1][1] - ends[0][1]))), H - s)
        out.append(np.asarray(photo.resize((size, size), Image.BILINEAR, box=(x, y, x + s, y + s)), dtype=np.uint8))
    return np.stack(out)


def prepare_video_demo(
    cache_dir: str | os.PathLike, clips_per_class: tuple[int, int] = (4, 1), n_frames: int = 64, size: int = 80
) -> Path:
    """Build (once) ``cache_dir/video_demo_v1/{train,val}/<photo>/clip_k.webm`` and return its root."""
    from skimage import data as skdata

    root = Path(cache_dir) / f"video_demo_v{DEMO_VERSION}"
    if (root / "DONE").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in zip(("train", "val"), clips_per_class, strict=True):
        for ci, name in enumerate(_DEMO_PHOTOS):
            img = getattr(skdata, name)()
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                rng = np.random.default_rng((DEMO_VERSION, ci, k, 0 if split == "train" else 1))
                encode_video(tmp / split / name / f"clip_{k}.webm", _pan_zoom(img, rng, n_frames, size))
    (tmp / "DONE").write_text("ok\n")
    if root.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, root)
    return root
