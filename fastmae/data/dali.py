"""DALI loader: ROI JPEG decode fused with the random-resized crop, bicubic resize, flip.

One capability check (:func:`_dali_device`) picks the backend: with a CUDA ``device`` and a visible GPU
the decoder runs ``mixed`` (nvJPEG, ``hw_decoder_load`` of the work on the A100/H100 hardware decoder,
nvJPEG buffers preallocated for ImageNet's largest image as NVIDIA's ImageNet examples do) and the
resize/flip on the GPU; otherwise ``device_id=None`` and the same operators run on the CPU.

Why ``decoders.image_slice`` and not ``decoders.image_random_crop``: the latter draws crops from a
per-pipeline RNG whose state advances with every sample, so a crop depends on everything decoded
before it and a mid-epoch resume cannot reproduce it. Here the crop windows are a pure function of
``(seed, epoch, index)``, drawn for a whole batch in one vectorized call (``ImageDataset.params``, the
call the torch loader makes) and passed to the ROI decoder, which decodes only the window.

One pipeline per loader, built on first use. Everything that changes per batch or per epoch - the
encoded file (folders: its path, read by ``fn.io.file.read`` in DALI's threads; tar shards: bytes read
with ``os.pread`` at offsets indexed by the scan) and the crop/flip or eval geometry - enters through
one external source fed from an endless stream of batch plans: the rest of the current epoch, then
the following epochs. DALI prefetches across epoch boundaries, so consecutive epochs cost no setup.
When iteration starts somewhere the stream is not (``load_state_dict``, ``set_epoch`` to another
epoch, an abandoned epoch), the stream is re-pointed and the few prefetched batches are drained.
A file that passes the scan but fails to decode stops the pipeline; the loader finds the culprit,
substitutes the next good index (the torch loader's rule), rebuilds the pipeline at the current step
and carries on (the only rebuild). What DALI would not refuse but the torch loader does is checked before a
file is first fed (:meth:`DaliLoader._precheck`, once per file): a decompression bomb by its scanned size,
the 128 MiB per-file read cap, and JPEG image data holding markers that cannot stand there (libjpeg-turbo
decodes such files to garbage with a warning on stderr; PIL refuses them). Every substitution is counted and
named in ``bad_files`` as the torch loader's are.
"""

from __future__ import annotations

import io
import os
from collections import deque

import numpy as np
import torch
from PIL import Image

from .image_io import MAX_PIXELS
from .loader import BaseLoader, ImageDataset
from .sources import Source
from .text import printable

__all__ = ["DALI_DECODES", "DaliLoader", "import_dali", "train_crop"]

# How a training crop is decoded: "roi" decodes only the window (decoders.image_slice; on the GPU it may bypass
# the A100/H100 hardware JPEG engines); "whole" decodes the whole image (decoders.image: nvJPEG's hardware path
# at hw_decoder_load) and crops + resizes + flips in one GPU resize. bench/gpu_report.py's data section times both.
DALI_DECODES = ("roi", "whole")


def import_dali():
    """-> (fn, pipeline_def, types); an ImportError naming the extra when DALI is absent."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise ImportError("loader='dali' needs NVIDIA DALI: pip install 'fastmae[dali]' (nvidia-dali-cuda130)") from e
    return fn, pipeline_def, types


def _dali_device(device: torch.device) -> int | None:
    """The single GPU/CPU decision: a CUDA device id for mixed decode, or None for the CPU pipeline."""
    if device.type == "cuda" and torch.cuda.is_available():
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


# Markers that may follow 0xFF inside JPEG entropy-coded data, up to the end of image: stuffing (00), fill (FF),
# restarts (D0-D7), the end (D9), and between the scans of a progressive file another scan (DA), tables (C4,
# DB), a restart interval (DD), comments and application data (FE, E0-EF). A frame marker (SOFn) or a reserved
# code there is corruption.
_SCAN_MARKERS = np.zeros(256, bool)
_SCAN_MARKERS[[0x00, 0xFF, 0xD9, 0xDA, 0xC4, 0xDB, 0xDD, 0xFE, *range(0xD0, 0xD8), *range(0xE0, 0xF0)]] = True


def jpeg_marker_problem(data: bytes) -> str | None:
    """Why a JPEG's image data cannot be right (a marker that cannot stand inside it), or None. Reads the bytes
    once with numpy, no decode: it catches spliced or overwritten data, not every flipped bit."""
    if not data.startswith(b"\xff\xd8"):
        return None  # not a JPEG: the decoders judge it
    a = np.frombuffer(data, np.uint8)
    pos = 2
    while pos + 4 <= len(a) and a[pos] == 0xFF and a[pos + 1] != 0xDA:  # header segments up to the first scan
        pos += 2 + (int(a[pos + 2]) << 8 | int(a[pos + 3]))
    if pos + 4 > len(a) or a[pos] != 0xFF:
        return "JPEG header segments run past the data"
    ff = np.flatnonzero(a[pos + 2 : -1] == 0xFF) + pos + 2
    following = a[ff + 1]
    end = np.flatnonzero(following == 0xD9)
    following = following[: end[0]] if len(end) else following
    bad = np.flatnonzero(~_SCAN_MARKERS[following])
    if len(bad):
        return f"marker 0xFF{int(following[bad[0]]):02X} inside the image data at byte {int(ff[bad[0]])}"
    return None


_ROI_START = (np.array([0.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32))
_ROI_END = (np.array([1.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32))


# NVIDIA's ImageNet examples: nvJPEG buffers sized for the largest ImageNet image, so the mixed decoder
# never reallocates at run time. Only the mixed (GPU) decoder takes them.
_MIXED_DECODER_HINTS = dict(
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


def train_crop(fn, enc, anchor, shape, roi_start, roi_end, size: int, whole: bool, dec_kw: dict, rs_kw: dict):
    """The training crop in a DALI graph: the window (``anchor``, ``shape``: (x, y) pixels) resized to ``size`` and
    flipped through the resize ROI (``roi_start``/``roi_end``: relative to the window, (H, W) order). ``whole``
    decodes the whole image and turns the window into an absolute resize ROI; otherwise only the window is decoded."""
    if not whole:
        img = fn.decoders.image_slice(enc, anchor, shape, normalized_anchor=False, normalized_shape=False, **dec_kw)
        return fn.resize(img, resize_x=size, resize_y=size, roi_start=roi_start, roi_end=roi_end, roi_relative=True,
                         **rs_kw)
    img = fn.decoders.image(enc, **dec_kw)
    origin, extent = fn.stack(anchor[1], anchor[0]), fn.stack(shape[1], shape[0])  # (x, y) -> (H, W) order
    return fn.resize(img, resize_x=size, resize_y=size, roi_start=origin + roi_start * extent,
                     roi_end=origin + roi_end * extent, roi_relative=False, **rs_kw)


def decoder_kwargs(mixed: bool, hw_decoder_load: float) -> dict:
    """Keyword arguments of the image decoders: the backend, and for ``mixed`` the hardware-decoder share
    and the preallocation hints."""
    if not mixed:
        return {"device": "cpu"}
    return {"device": "mixed", "hw_decoder_load": hw_decoder_load, **_MIXED_DECODER_HINTS}


class DaliLoader(BaseLoader):
    kind = "dali"

    def __init__(
        self,
        src: Source,
        *,
        augment: str = "mae",
        num_workers: int = 2,
        hw_decoder_load: float = 0.65,
        prefetch: int = 2,
        resize_filter: str = "cubic",
        dali_decode: str = "roi",
        **kw,
    ) -> None:
        """``resize_filter="triangular"`` (antialiased linear) is a diagnostic for benchmarks only: it
        departs from the MAE recipe's bicubic resize. ``dali_decode``: :data:`DALI_DECODES`."""
        if resize_filter not in ("cubic", "triangular"):
            raise ValueError(f"resize_filter must be 'cubic' or 'triangular', got {resize_filter!r}")
        if dali_decode not in DALI_DECODES:
            raise ValueError(f"dali_decode must be one of {DALI_DECODES}, got {dali_decode!r}")
        self.dali_decode = dali_decode
        self._fn, self._pipeline_def, self._types = import_dali()
        super().__init__(num_samples=len(src), classes=src.classes, skipped=src.bad, **kw)
        self.source = src
        self.dataset = ImageDataset(src, self.img_size, augment, self.seed)
        self.augment = augment
        self.num_threads = max(1, num_workers)
        self.hw_decoder_load = hw_decoder_load
        self.prefetch = prefetch
        self.resize_filter = resize_filter
        self.device_id = _dali_device(self.device)
        self.builds = 0  # pipelines built so far: 1 for a whole run without decode failures
        self._known_bad: dict[int, str] = {}
        self._prechecked = np.zeros(len(src), bool)  # files that passed _precheck (each is checked once per run)
        self._pipe = None
        self._stream = None
        self._stream_pos: tuple[int, int] | None = None  # (epoch, step) of the next plan the stream feeds
        self._inflight: deque = deque()  # plans fed to DALI whose batch has not been returned yet

    # -- plan -------------------------------------------------------------------------------------
    def _replacement(self, i: int) -> int:
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            if j not in self._known_bad and self._usable(j):
                return j
        raise RuntimeError(f"no decodable image left in {printable(self.source.root)}")

    def _usable(self, j: int) -> bool:
        """False (and ``j`` known bad) when the torch loader would refuse file ``j`` but DALI might not."""
        if not self._prechecked[j]:
            why = self._precheck(j)
            if why:
                self._known_bad[j] = why
                return False
            self._prechecked[j] = True
        return True

    def _precheck(self, j: int) -> str:
        """The torch loader's refusals that DALI lacks, with its wording: a bomb by the scanned size, the per-file
        read cap (a bounded read, as ``Source.read_bytes``), JPEG data that cannot be right. '' when none."""
        w, h = self.source.sizes[j]
        if w * h > MAX_PIXELS:
            return f"decode failed (ValueError: {w}x{h} pixels is more than the limit of {MAX_PIXELS})"
        try:
            problem = jpeg_marker_problem(self.source.read_bytes(j))
        except (OSError, ValueError) as e:
            return f"decode failed ({type(e).__name__}: {str(e)[:80]})"
        return f"decode failed (ValueError: {problem[:80]})" if problem else ""

    def _plans(self, epoch: int, step: int):
        """Endless stream of ``(epoch, step, original ids, n_valid)`` from ``(epoch, step)`` on; ids are
        padded to the batch size with the last one (a short final batch is sliced after decoding)."""
        bs = self.batch_size
        while True:
            idx = self.epoch_indices(epoch)
            for s in range(step, self.steps_per_epoch):
                orig = idx[s * bs : (s + 1) * bs].tolist()
                n_valid = len(orig)
                self._stream_pos = (epoch, s + 1) if s + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield epoch, s, orig + [orig[-1]] * (bs - n_valid), n_valid
            epoch, step = epoch + 1, 0

    def _point_stream(self, epoch: int, step: int) -> None:
        self._stream = self._plans(epoch, step)
        self._stream_pos = (epoch, step)

    def _feed(self):
        """The external source: called by DALI (on this thread) each time it schedules a batch."""
        epoch, step, orig, n_valid = next(self._stream)
        use = [i if i not in self._known_bad and self._usable(i) else self._replacement(i) for i in orig]
        params = self.dataset.params(epoch, orig, use)
        self._inflight.append((epoch, step, orig, use, n_valid))
        src = self.source
        if src.kind == "folder":
            cols = [[np.frombuffer(os.fsencode(src.locs[j]), dtype=np.uint8) for j in use]]  # any file-name bytes
        else:
            cols = [[np.frombuffer(src.read_bytes(j), dtype=np.uint8) for j in use]]
        if params.shape[1] == 5:
            cols.append(list(params[:, 0:2].astype(np.float32)))  # anchor (x, y)
            cols.append(list(params[:, 2:4].astype(np.float32)))  # shape (w, h)
            # the flip is fused into the resize: a relative ROI running right to left, (H, W) order
            cols.append([_ROI_START[f] for f in params[:, 4]])
            cols.append([_ROI_END[f] for f in params[:, 4]])
        else:
            cols.append(list(params[:, 0].astype(np.float32)))
            cols.append(list(params[:, 1].astype(np.float32)))
            cols.append(list(params[:, 2:4].astype(np.float32)))
        return tuple(cols)

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self):
        fn, pipeline_def, types = self._fn, self._pipeline_def, self._types
        s = self.img_size
        folder = self.source.kind == "folder"
        train = self.augment not in ("eval", "none")
        mixed = self.device_id is not None
        dec_kw = {"output_type": types.RGB, "adjust_orientation": False, **decoder_kwargs(mixed, self.hw_decoder_load)}
        if self.resize_filter == "cubic":
            rs_kw = {"interp_type": types.INTERP_CUBIC, "antialias": True}
        else:
            rs_kw = {"min_filter": types.INTERP_TRIANGULAR, "mag_filter": types.INTERP_CUBIC}

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
        )
        def pipe():
            ext = fn.external_source(source=self._feed, num_outputs=5 if train else 4, batch=True)
            enc = fn.io.file.read(ext[0]) if folder else ext[0]
            if train:
                img = train_crop(fn, enc, *ext[1:], s, self.dali_decode == "whole", dec_kw, rs_kw)
            else:
                rw, rh, anchor = ext[1:]
                img = fn.decoders.image(enc, **dec_kw)
                img = fn.resize(img, resize_x=rw, resize_y=rh, **rs_kw)
                img = fn.slice(img, anchor, np.array([s, s], np.float32), normalized_anchor=False, normalized_shape=False)
            return img

        p = pipe()
        p.build()
        self.builds += 1
        return p

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = out.as_tensor()
        dev = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=dev)
        # on the GPU the copy is ordered on torch's current stream, so no host sync is needed here
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        feed_ndarray(t, dst, cuda_stream=stream)
        return dst

    # -- bad files --------------------------------------------------------------------------------
    def _decodes(self, j: int) -> tuple[bool, str]:
        try:
            data = self.source.read_bytes(j)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # PIL's failure is the cheap, common diagnosis
            return False, f"decode failed ({type(e).__name__}: {str(e)[:80]})"
        fn, pipeline_def, types = self._fn, self._pipeline_def, self._types
        arr = np.frombuffer(data, dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            return fn.decoders.image(fn.external_source(source=lambda: [arr], batch=True), output_type=types.RGB)

        try:
            p = probe()
            p.build()
            p.run()
        except Exception as e:  # DALI raises RuntimeError subclasses with its own message
            return False, f"DALI decode failed ({str(e).splitlines()[0][:80]})"
        return True, ""

    def _find_culprits(self, use) -> list[int]:
        found = []
        for j in dict.fromkeys(use):
            ok, why = self._decodes(j)
            if not ok:
                self._known_bad[j] = why
                found.append(j)
        return found

    # -- iteration --------------------------------------------------------------------------------
    def _position_pipeline(self, epoch: int, step: int) -> None:
        """Make the next batch the pipeline returns the one at ``(epoch, step)``."""
        if self._pipe is None:
            self._point_stream(epoch, step)
            self._pipe = self._build()
            return
        head = self._inflight[0][:2] if self._inflight else self._stream_pos
        if head == (epoch, step):
            return
        stale = len(self._inflight)
        self._point_stream(epoch, step)
        for _ in range(stale):  # batches DALI prefetched from the old position: decoded, discarded
            self._pipe.run()
            self._inflight.popleft()

    def _batches(self, epoch, start):
        step = start
        while step < self.steps_per_epoch:
            self._position_pipeline(epoch, step)
            try:
                (out,) = self._pipe.run()
            except Exception:  # a decode error inside DALI: find it, substitute, rebuild at this step
                # prefetching may surface a later batch's error: search every batch in flight
                ahead = [j for plan in self._inflight for j in plan[3]]
                self._pipe, self._inflight = None, deque()
                if not self._find_culprits(ahead):
                    raise
                continue
            _, _, orig, use, n_valid = self._inflight.popleft()
            imgs = self._to_torch(out)[:n_valid]
            self._note_substitutions(orig[:n_valid], use[:n_valid])
            step += 1
            labels = torch.tensor([self.source.labels[j] for j in use[:n_valid]], dtype=torch.int64)
            yield self._finish(imgs, labels)

    def _note_substitutions(self, orig, use) -> None:
        """Count and name as the torch loader does: every file tried and refused on the way from a sample's own
        file to its substitute (all known bad: ``_replacement`` skips only those)."""
        n = len(self.source)
        tried = [(i + k) % n for i, j in zip(orig, use, strict=True) if i != j for k in range((j - i) % n)]
        if tried:
            self._record_bad([(self.source.names[t], self._known_bad[t]) for t in tried])
