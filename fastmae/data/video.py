"""Video clips for VideoMAE on the image loaders' base: folder scan, clip sampling, decoding, crop.

Layout: ``root/{train,val}/<class>/<clip>.{webm,mkv,avi,mp4,mov}`` (or clips straight under ``root``,
one class named after the folder); class ids are the sorted class-folder names.

A sample is ``num_frames`` frames ``frame_stride`` apart (VideoMAE: 16 x 4, a span of 61 frames).
Sharding, the ``(epoch, step)`` position, exact resume for any worker count, ``set_epoch``, device
transfer, normalization and bad-file accounting are :class:`fastmae.data.loader.BaseLoader`'s, shared
with the image loaders. All randomness is a pure function of ``(seed, epoch, clip index)``
(:func:`clip_params`): train draws a start frame, then one random-resized-crop window and flip for the
whole clip; eval takes the central span and the central square. Frames are resized (bilinear,
antialiased) to ``img_size`` and rounded to uint8: uint8 ``(N, T, H, W, C)`` or normalized float
``(N, C, T, H, W)``.

Decoders: ``loader="torch"`` decodes with PyAV (its wheel ships ffmpeg) in DataLoader workers;
``loader="dali"`` uses ``fn.decoders.video`` on the CPU (one pipeline per loader, fed per batch), which
handles VP8, VP9 and MJPEG only (H.264/HEVC/AV1 need the GPU ``mixed`` backend, not wired here).
PyAV also probes clips (codec, size, frame count by demuxing) when the set is scanned.

Bad input: unreadable files, clips shorter than the sampled span and codecs the chosen CPU decoder
cannot handle are left out by the scan; a clip that fails to decode at runtime is replaced by the next
decodable index (its sampling drawn from the failed clip's stream), as for images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import VIDEO_EXTENSIONS
from .augment import FLIP_DRAW, rrc_windows, sample_uniforms
from .loader import BaseLoader
from .text import printable

__all__ = [
    "DALI_CPU_CODECS",
    "VideoDecodeError",
    "VideoItem",
    "ClipDataset",
    "DaliVideoLoader",
    "probe_video",
    "scan_videos",
    "decode_pyav",
    "decode_dali",
    "clip_params",
    "crop_resize",
    "require_av",
]

DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")


class VideoDecodeError(ValueError):
    """A clip that cannot be read or decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoItem:
    path: str
    label: int
    num_frames: int
    width: int
    height: int
    codec: str


def require_av():
    try:
        import av
    except ImportError:
        raise ImportError("video data needs PyAV: pip install av (its wheel ships its own ffmpeg)") from None
    return av


# ---- probing and scanning ------------------------------------------------------------------------------


def probe_video(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """-> (codec, frame count, width, height). Frames are counted by demuxing (no decode): container
    frame counts are missing in WebM. Raises VideoDecodeError for a file ffmpeg cannot open."""
    av = require_av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            s = c.streams.video[0]
            codec, w, h = s.codec_context.name, s.codec_context.width, s.codec_context.height
            n = sum(1 for pkt in c.demux(s) if pkt.size)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot open video ({type(e).__name__}: {e})") from None
    return codec, n, w, h


def scan_videos(root: str | os.PathLike, span: int, decoder: str) -> tuple[list[VideoItem], list[tuple[str, str]], list[str]]:
    """Clips under ``root`` -> (usable items, [(path, reason) skipped], class names).

    Class folders (sorted names = class ids) or clips directly under ``root`` (one class)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {printable(root)} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    if classes:
        for label, name in enumerate(classes):
            files += [(f, label) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in VIDEO_EXTENSIONS]
    else:
        classes = [root.name]
        files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in VIDEO_EXTENSIONS]
    items, bad = [], []
    for f, label in files:
        try:
            codec, n, w, h = probe_video(f)
        except VideoDecodeError as e:
            bad.append((str(f), str(e)))
            continue
        if n < span:
            bad.append((str(f), f"{n} frames, shorter than the sampled span of {span}"))
        elif decoder == "dali" and codec not in DALI_CPU_CODECS:
            bad.append(
                (
                    str(f),
                    f"codec {codec} cannot be decoded by DALI on the CPU (only {', '.join(DALI_CPU_CODECS)}); "
                    "use loader=torch or the GPU",
                )
            )
        else:
            items.append(VideoItem(str(f), label, n, w, h, codec))
    return items, bad, classes


# ---- decoding -------------------------------------------------------------------------------------------


def decode_pyav(path: str, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (ascending or not, repeats allowed) of a clip -> uint8 (len, H, W, 3) RGB."""
    av = require_av()
    want = sorted(set(indices))
    last = want[-1]
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i in want:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    if len(got) != len(want):
        raise VideoDecodeError(f"{path}: decoded only {len(got)} of the frames up to index {last}")
    return np.stack([got[i] for i in indices])


class _DaliClipDecoder:
    """``fn.decoders.video`` on the CPU, built once: encoded clips + start frames -> ``num_frames`` frames
    ``stride`` apart. Batches of any size up to ``max_batch`` are fed per call."""

    def __init__(self, max_batch: int, num_frames: int, stride: int, num_threads: int = 1):
        from .dali import import_dali

        fn, pipeline_def, types = import_dali()

        @pipeline_def(batch_size=max_batch, num_threads=max(1, num_threads), device_id=None, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            start = fn.external_source(name="start", dtype=types.INT32)
            return fn.decoders.video(
                enc, device="cpu", start_frame=start, sequence_length=num_frames, stride=stride, pad_mode="none"
            )

        self.pipe = pipe()
        self.pipe.build()
        self.builds = 1

    def __call__(self, paths: list[str], starts: list[int]) -> list[np.ndarray]:
        self.pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in paths])
        self.pipe.feed_input("start", [np.array(s, dtype=np.int32) for s in starts])
        try:
            (out,) = self.pipe.run()
        except RuntimeError as e:
            raise VideoDecodeError(f"DALI could not decode one of {paths}: {str(e).splitlines()[0]}") from None
        return [np.array(out[i]) for i in range(len(paths))]


def decode_dali(path: str, start: int, num_frames: int, stride: int) -> np.ndarray:
    """One clip through DALI's CPU decoder -> uint8 (num_frames, H, W, 3)."""
    return _DaliClipDecoder(1, num_frames, stride)([path], [start])[0]


# ---- sampling and geometry ------------------------------------------------------------------------------


def clip_params(
    seed: int, epoch: int, index: int, item: VideoItem, span: int, train: bool
) -> tuple[int, tuple[int, int, int, int], bool]:
    """-> (start frame, crop window (left, top, w, h), flip) of clip ``index`` in ``epoch``, drawn on
    ``item``'s geometry (the clip itself, or its substitute when it failed to decode)."""
    if train:
        u = sample_uniforms(seed, epoch, [index], FLIP_DRAW + 2)
        left, top, w, h = (int(v) for v in rrc_windows(u, [item.width], [item.height])[0])
        start = int(u[0, FLIP_DRAW + 1] * (item.num_frames - span + 1))
        return start, (left, top, w, h), bool(u[0, FLIP_DRAW] < 0.5)
    side = min(item.width, item.height)
    return (item.num_frames - span) // 2, ((item.width - side) // 2, (item.height - side) // 2, side, side), False


def crop_resize(frames: np.ndarray, window: tuple[int, int, int, int], flip: bool, img_size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3), window (left, top, w, h) -> uint8 (T, img_size, img_size, 3)."""
    left, top, w, h = window
    x = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + h, left : left + w])).permute(0, 3, 1, 2).float()
    if (h, w) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset addressed by ``(global index, epoch)`` -> (uint8 (T, S, S, 3), label, bad list),
    PyAV decoding; the contract :class:`fastmae.data.loader.TorchLoader` drives."""

    def __init__(self, items: list[VideoItem], *, img_size: int, num_frames: int, frame_stride: int, train: bool, seed: int):
        self.items, self.img_size, self.train, self.seed = list(items), img_size, train, seed
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.span = (num_frames - 1) * frame_stride + 1

    def __len__(self) -> int:
        return len(self.items)

    def batch_keys(self, epoch: int, indices: np.ndarray) -> list[tuple[int, int]]:
        return [(i, epoch) for i in indices.tolist()]

    def __getitem__(self, key: tuple[int, int]):
        idx, epoch = key
        bad = []
        n = len(self.items)
        for k in range(n):
            it = self.items[(idx + k) % n]
            start, window, flip = clip_params(self.seed, epoch, idx, it, self.span, self.train)
            try:
                frames = decode_pyav(it.path, list(range(start, start + self.span, self.frame_stride)))
            except VideoDecodeError as e:  # substitute deterministically, keep training
                bad.append((it.path, f"decode failed ({str(e).removeprefix(it.path + ': ')[:120]})"))
                continue
            return crop_resize(frames, window, flip, self.img_size).numpy(), it.label, bad
        raise RuntimeError(f"no decodable clip left among {n} clips")


class DaliVideoLoader(BaseLoader):
    """Clips decoded by DALI's CPU video decoder (one pipeline per loader) in the main process, cropped
    and resized with torch; same sampling, order and substitution rule as the PyAV loader."""

    kind = "dali"

    def __init__(self, dataset: ClipDataset, *, classes: list[str], skipped=(), num_workers: int = 1, **kw) -> None:
        super().__init__(num_samples=len(dataset), classes=classes, skipped=skipped, **kw)
        self.dataset = dataset
        self._decoder = _DaliClipDecoder(self.batch_size, dataset.num_frames, dataset.frame_stride, max(1, num_workers))
        self._known_bad: dict[int, str] = {}

    @property
    def builds(self) -> int:
        return self._decoder.builds

    def _replacement(self, i: int) -> int:
        n = self.num_samples
        for k in range(n):
            j = (i + k) % n
            if j not in self._known_bad:
                return j
        raise RuntimeError(f"no decodable clip left among {n} clips")

    def _decode(self, epoch: int, orig: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.dataset
        while True:
            use = [self._replacement(i) for i in orig]
            params = [clip_params(self.seed, epoch, i, ds.items[j], ds.span, ds.train) for i, j in zip(orig, use, strict=True)]
            try:
                raw = self._decoder([ds.items[j].path for j in use], [p[0] for p in params])
            except VideoDecodeError:
                found = False
                for j, p in dict(zip(use, params, strict=True)).items():
                    try:
                        self._decoder([ds.items[j].path], [p[0]])
                    except VideoDecodeError as e:
                        self._known_bad[j] = f"DALI decode failed ({str(e)[:120]})"
                        found = True
                if not found:
                    raise
                continue
            self._record_bad([(ds.items[i].path, self._known_bad[i]) for i in orig if i in self._known_bad])
            clips = [crop_resize(r, p[1], p[2], ds.img_size) for r, p in zip(raw, params, strict=True)]
            return torch.stack(clips), torch.tensor([ds.items[j].label for j in use], dtype=torch.int64)

    def _batches(self, epoch, start):
        idx = self.epoch_indices(epoch)
        bs = self.batch_size
        for s in range(start, self.steps_per_epoch):
            clips, labels = self._decode(epoch, idx[s * bs : (s + 1) * bs].tolist())
            yield self._finish(clips, labels)
