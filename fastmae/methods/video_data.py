"""Video clips for VideoMAE: folder scan, clip sampling, decoding (DALI CPU or PyAV), crop, normalize.

Layout: ``root/{train,val}/<class>/<clip>.{webm,mkv,avi,mp4,mov}`` (or clips straight under ``root``,
label 0). ``data="demo"`` builds a small VP9 set offline from scikit-image photos (pans and zooms,
one class per photo) and caches it.

A sample is ``num_frames`` frames ``frame_stride`` apart (VideoMAE: 16 x 4, a span of 61 frames).
All randomness is a pure function of ``(seed, epoch, clip index)`` (``fastmae.data.augment``), so
clips do not depend on worker count or resume point: train draws a start frame, then one
random-resized-crop window and flip for the whole clip; eval takes the central span and the central
square. Frames are resized (bilinear, antialiased) to ``img_size`` and rounded to uint8, then either
returned as uint8 ``(N, T, H, W, C)`` or normalized to float ``(N, C, T, H, W)`` with
``(x - 255*mean) * (1 / (255*std))`` (``fastmae.reference.normalize_uint8``'s formula).

Decoders: ``loader="dali"`` uses ``fn.decoders.video`` on the CPU, which handles VP8, VP9 and MJPEG
only (H.264/HEVC/AV1 need the GPU ``mixed`` backend); ``loader="torch"`` uses PyAV (its wheel ships
ffmpeg). ``loader="synthetic"`` yields seeded random clips without reading files (benchmarks).
PyAV is also used to probe clips (codec, size, frame count by demuxing) when the set is scanned.

Bad input never stops a run silently: unreadable files, clips shorter than the sampled span and
codecs the chosen CPU decoder cannot handle are skipped and listed in ``bad_files`` (path, reason);
a set with no usable clip raises ValueError naming the reasons.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastmae.data.augment import epoch_permutation, rrc_params, sample_rng

__all__ = [
    "VIDEO_EXTS",
    "DALI_CPU_CODECS",
    "VideoDecodeError",
    "VideoItem",
    "VideoClipLoader",
    "probe_video",
    "scan_videos",
    "decode_pyav",
    "decode_dali",
    "encode_video",
    "prepare_video_demo",
    "build_video_loader",
]

VIDEO_EXTS = (".webm", ".mkv", ".avi", ".mp4", ".mov")
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_VERSION = 1


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


def _require_av():
    try:
        import av
    except ImportError:
        raise ImportError("video data needs PyAV: pip install av (its wheel ships its own ffmpeg)") from None
    return av


# ---- probing and scanning ------------------------------------------------------------------------------


def probe_video(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """-> (codec, frame count, width, height). Frames are counted by demuxing (no decode): container
    frame counts are missing in WebM. Raises VideoDecodeError for a file ffmpeg cannot open."""
    av = _require_av()
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


def scan_videos(root: str | os.PathLike, span: int, decoder: str) -> tuple[list[VideoItem], list[tuple[str, str]]]:
    """Clips under ``root`` (class folders, sorted, or flat) -> (usable items, [(path, reason) skipped])."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files: list[tuple[Path, int]] = []
    if classes:
        for label, name in enumerate(classes):
            files += [(f, label) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in VIDEO_EXTS]
    else:
        files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in VIDEO_EXTS]
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
            bad.append((str(f), f"codec {codec} cannot be decoded by DALI on the CPU (only {', '.join(DALI_CPU_CODECS)}); "
                                f"use loader=torch or the GPU"))
        else:
            items.append(VideoItem(str(f), label, n, w, h, codec))
    return items, bad


# ---- decoding -------------------------------------------------------------------------------------------


def decode_pyav(path: str, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (ascending or not, repeats allowed) of a clip -> uint8 (len, H, W, 3) RGB."""
    av = _require_av()
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
    """``fn.decoders.video`` on the CPU: encoded clips + start frames -> ``num_frames`` frames ``stride`` apart."""

    def __init__(self, max_batch: int, num_frames: int, stride: int, num_threads: int = 1):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=max_batch, num_threads=max(1, num_threads), device_id=None, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            start = fn.external_source(name="start", dtype=types.INT32)
            return fn.decoders.video(enc, device="cpu", start_frame=start, sequence_length=num_frames, stride=stride,
                                     pad_mode="none")

        self.pipe = pipe()
        self.pipe.build()

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


# ---- geometry -------------------------------------------------------------------------------------------


def _crop_resize(frames: np.ndarray, window: tuple[int, int, int, int], flip: bool, img_size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3), window (left, top, w, h) -> uint8 (T, img_size, img_size, 3)."""
    left, top, w, h = window
    x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + h, left:left + w])).permute(0, 3, 1, 2).float()
    if (h, w) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _normalize(clips: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, T, H, W, C) -> float32 (N, C, T, H, W), as fastmae.reference.normalize_uint8."""
    shift = torch.tensor(mean, dtype=torch.float32) * 255.0
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32) * 255.0)
    return ((clips.float() - shift) * scale).permute(0, 4, 1, 2, 3).contiguous()


# ---- the loader -----------------------------------------------------------------------------------------


class VideoClipLoader:
    """Batches of clips, resumable exactly: ``state_dict() = {"epoch", "position"}`` (batches already yielded
    in that epoch); iterating past an epoch's end starts the next epoch.

    Iterating yields ``(clips, labels)``: clips float (N, C, T, H, W) normalized, or uint8 (N, T, H, W, C)
    with ``output="uint8"``; labels int64 (N,).
    """

    def __init__(self, items: list[VideoItem], *, batch_size: int, img_size: int, num_frames: int = 16,
                 frame_stride: int = 4, train: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 output: str = "float", decoder: str = "torch", num_workers: int = 0, drop_last: bool = True,
                 bad_files: list[tuple[str, str]] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if decoder not in ("torch", "dali", "synthetic"):
            raise ValueError(f"loader must be torch, dali or synthetic for video, got {decoder!r}")
        if num_frames < 1 or frame_stride < 1:
            raise ValueError(f"num_frames and frame_stride must be positive, got {num_frames}, {frame_stride}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.items = list(items)
        self.batch_size, self.img_size, self.num_frames, self.frame_stride = batch_size, img_size, num_frames, frame_stride
        self.span = (num_frames - 1) * frame_stride + 1
        short = [it.path for it in self.items if it.num_frames < self.span]
        if short:
            raise ValueError(f"{len(short)} clips are shorter than the sampled span of {self.span} frames, e.g. {short[0]}")
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.output, self.decoder, self.num_workers, self.drop_last = output, decoder, num_workers, drop_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.bad_files = list(bad_files or [])
        self.bad_count = len(self.bad_files)
        self.epoch, self.position = 0, 0
        self._dali: _DaliClipDecoder | None = None
        per_rank = len(self.items) // world_size
        self.per_rank = per_rank
        self.steps_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.items)} usable clips over {world_size} rank(s) give no batch of {batch_size}")

    # ---- resumable position ----
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_items", len(self.items)) != len(self.items):
            raise ValueError(f"the checkpoint's data position is for {state['num_items']} clips, this set has {len(self.items)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ---- sampling ----
    def _order(self) -> np.ndarray:
        n = len(self.items)
        order = epoch_permutation(self.seed, self.epoch, n) if self.train else np.arange(n)
        return order[self.rank:self.per_rank * self.world_size:self.world_size]

    def clip_params(self, index: int) -> tuple[int, tuple[int, int, int, int], bool]:
        """-> (start frame, crop window (left, top, w, h), flip) for clip ``index`` in the current epoch."""
        it = self.items[index]
        if self.train:
            rng = sample_rng(self.seed, self.epoch, index)
            start = int(rng.integers(0, it.num_frames - self.span + 1))
            window = rrc_params(rng, it.width, it.height)
            return start, window, bool(rng.random() < 0.5)
        side = min(it.width, it.height)
        return (it.num_frames - self.span) // 2, ((it.width - side) // 2, (it.height - side) // 2, side, side), False

    def _load_batch(self, b: int, order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [int(i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
        params = [self.clip_params(i) for i in idx]
        labels = torch.tensor([self.items[i].label for i in idx], dtype=torch.int64)
        if self.decoder == "synthetic":
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + b) & 0x7FFFFFFF)
            shape = (len(idx), self.num_frames, self.img_size, self.img_size, 3)
            clips = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        else:
            if self.decoder == "dali":
                if self._dali is None:
                    self._dali = _DaliClipDecoder(self.batch_size, self.num_frames, self.frame_stride, self.num_workers or 1)
                raw = self._dali([self.items[i].path for i in idx], [p[0] for p in params])
            else:
                raw = [decode_pyav(self.items[i].path, list(range(p[0], p[0] + self.span, self.frame_stride)))
                       for i, p in zip(idx, params, strict=True)]
            clips = torch.stack([_crop_resize(r, p[1], p[2], self.img_size) for r, p in zip(raw, params, strict=True)])
        if self.output == "float":
            return _normalize(clips, self.mean, self.std), labels
        return clips, labels

    def __iter__(self):
        # A finished epoch rolls over to the next one (as the image loaders do), so resuming from a checkpoint
        # taken at an epoch's end continues with the next epoch instead of replaying it.
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        todo = range(self.position, self.steps_per_epoch)
        if self.num_workers > 0 and self.decoder != "dali":
            ds = _BatchDataset(self, order)
            batches = torch.utils.data.DataLoader(ds, batch_size=None, sampler=list(todo), num_workers=self.num_workers,
                                                  persistent_workers=False)
        else:
            batches = (self._load_batch(b, order) for b in todo)
        for batch in batches:
            self.position += 1
            yield batch


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, loader: VideoClipLoader, order: np.ndarray):
        self.loader, self.order = loader, order

    def __len__(self) -> int:
        return self.loader.steps_per_epoch

    def __getitem__(self, b: int):
        return self.loader._load_batch(b, self.order)


# ---- writing clips and the demo set ---------------------------------------------------------------------


def encode_video(path: str | os.PathLike, frames: np.ndarray, codec: str = "vp9", fps: int = 25, crf: int = 10) -> Path:
    """uint8 (T, H, W, 3) RGB -> a VP9/VP8 WebM, MJPEG AVI or H.264 MP4 file at ``path`` (via PyAV)."""
    av = _require_av()
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


_DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


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


def prepare_video_demo(cache_dir: str | os.PathLike, clips_per_class: tuple[int, int] = (4, 1), n_frames: int = 64,
                       size: int = 80) -> Path:
    """Build (once) ``cache_dir/video_demo_v1/{train,val}/<photo>/clip_k.webm``: VP9 pans and zooms over
    scikit-image's bundled photos, one class per photo. Written to a temporary folder, then renamed."""
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


def build_video_loader(cfg, info, split: str, output: str) -> VideoClipLoader:
    """The clip loader of a run config (``fastmae.config.PretrainConfig`` + the video fields read by getattr)."""
    num_frames = getattr(cfg, "num_frames", 16)
    stride = getattr(cfg, "frame_stride", 4)
    tubelet = getattr(cfg, "tubelet_size", 0) or 2
    if num_frames % tubelet:
        raise ValueError(f"num_frames {num_frames} is not divisible by the tubelet size {tubelet}")
    root = cfg.data
    if root == "demo":
        cache = Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae"))
        root = prepare_video_demo(cache)
    root = Path(root)
    folder = root / split if (root / split).is_dir() else root
    span = (num_frames - 1) * stride + 1
    # DALI decodes on the CPU even on a GPU machine: the "mixed" (NVDEC) backend is not wired yet.
    decoder = cfg.loader
    items, bad = scan_videos(folder, span, "dali" if decoder == "dali" else "torch")
    if not items:
        reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in bad[:3])
        raise ValueError(f"no usable clip of {span} frames in {folder}" + (f" ({len(bad)} skipped: {reasons})" if bad else ""))
    train = split == "train"
    return VideoClipLoader(
        items, batch_size=cfg.batch_size, img_size=cfg.img_size, num_frames=num_frames, frame_stride=stride, train=train,
        seed=cfg.seed, rank=info.rank if train else 0, world_size=info.world_size if train else 1, output=output,
        decoder=decoder, num_workers=cfg.num_workers, drop_last=train, bad_files=bad,
    )
