"""DALI loader: ROI JPEG decode fused with the random-resized crop, bicubic resize, flip.

One capability check (:func:`_dali_device`) picks the backend: with a CUDA ``device`` and a visible GPU
the decoder runs ``mixed`` (nvJPEG, ``hw_decoder_load`` of the work on the A100/H100 hardware decoder)
and the resize/flip on the GPU; otherwise ``device_id=None`` and the same operators run on the CPU.

Why ``decoders.image_slice`` and not ``decoders.image_random_crop``: the latter draws crops from a
per-pipeline RNG whose state advances with every sample, so a crop depends on everything decoded
before it and a mid-epoch resume cannot reproduce it. Here the crop windows are drawn on the host as
a pure function of ``(seed, epoch, index)`` (``augment.train_params``, the same windows the torch
loader uses) and passed to the ROI decoder, which decodes only the window - the same saving.

Readers: folders use ``fn.readers.file`` over this rank's ordered file list for the remaining steps of
the epoch (no reader-side shuffle; the pipeline is rebuilt per epoch and on resume); tar shards are
read by an external source with ``os.pread`` at offsets indexed by the scan. A file that passes the
scan but fails to decode stops the batch; the loader then finds the culprit, substitutes the next good
index (the torch loader's rule), rebuilds the pipeline at the current step and carries on.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .augment import eval_params, train_params
from .loader import BaseLoader
from .sources import Source
from .text import printable

__all__ = ["DaliLoader", "import_dali"]


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


_ROI_START = (np.array([0.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32))
_ROI_END = (np.array([1.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32))


class DaliLoader(BaseLoader):
    kind = "dali"

    def __init__(
        self,
        src: Source,
        *,
        num_workers: int = 2,
        hw_decoder_load: float = 0.65,
        prefetch: int = 2,
        resize_filter: str = "cubic",
        **kw,
    ) -> None:
        """``resize_filter="triangular"`` (antialiased linear) is a diagnostic for benchmarks only: it
        departs from the MAE recipe's bicubic resize."""
        if resize_filter not in ("cubic", "triangular"):
            raise ValueError(f"resize_filter must be 'cubic' or 'triangular', got {resize_filter!r}")
        self._fn, self._pipeline_def, self._types = import_dali()
        super().__init__(num_samples=len(src), classes=src.classes, skipped=src.bad, **kw)
        self.source = src
        self.dataset = src
        self.num_threads = max(1, num_workers)
        self.hw_decoder_load = hw_decoder_load
        self.prefetch = prefetch
        self.resize_filter = resize_filter
        self.device_id = _dali_device(self.device)
        self._known_bad: dict[int, str] = {}

    # -- plan -------------------------------------------------------------------------------------
    def _replacement(self, i: int) -> int:
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            if j not in self._known_bad:
                return j
        raise RuntimeError(f"no decodable image left in {printable(self.source.root)}")

    def _plan(self, epoch: int, start: int):
        """-> per remaining step: (original ids, ids to decode, n_valid), both padded to the batch.

        Only index bookkeeping happens upfront; crop windows are drawn per batch in the feed."""
        idx = self.epoch_indices(epoch)
        bs = self.batch_size
        steps = []
        for s in range(start, self.steps_per_epoch):
            orig = idx[s * bs : (s + 1) * bs].tolist()
            n_valid = len(orig)
            orig = orig + [orig[-1]] * (bs - n_valid)
            use = [self._replacement(i) for i in orig] if self._known_bad else orig
            steps.append((orig, use, n_valid))
        return steps

    def _params(self, epoch: int, orig, use):
        sizes = self.source.sizes
        if self.train:
            return [train_params(self.seed, epoch, i, *sizes[j]) for i, j in zip(orig, use, strict=True)]
        return [eval_params(*sizes[j], self.img_size) for j in use]

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, epoch: int, steps):
        fn, pipeline_def, types = self._fn, self._pipeline_def, self._types
        src, s = self.source, self.img_size
        folder = src.kind == "folder"
        train = self.train
        feed_iter = iter(steps)

        def feed():
            orig, use, _ = next(feed_iter)
            params = self._params(epoch, orig, use)
            cols = []
            if not folder:
                cols.append([np.frombuffer(src.read_bytes(j), dtype=np.uint8) for j in use])
            if train:
                cols.append([np.array(p[0:2], np.float32) for p in params])  # anchor (x, y)
                cols.append([np.array(p[2:4], np.float32) for p in params])  # shape (w, h)
                # the flip is fused into the resize: a relative ROI running right to left, (H, W) order
                cols.append([_ROI_START[p[4]] for p in params])
                cols.append([_ROI_END[p[4]] for p in params])
            else:
                cols.append([np.array(p[0], np.float32) for p in params])
                cols.append([np.array(p[1], np.float32) for p in params])
                cols.append([np.array(p[2:4], np.float32) for p in params])
            return tuple(cols)

        n_ext = (0 if folder else 1) + (4 if train else 3)
        mixed = self.device_id is not None
        dec_kw = {"device": "mixed" if mixed else "cpu", "output_type": types.RGB, "adjust_orientation": False}
        if mixed:
            dec_kw["hw_decoder_load"] = self.hw_decoder_load
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
            ext = fn.external_source(source=feed, num_outputs=n_ext, batch=True)
            if folder:
                files = [src.locs[j] for st in steps for j in st[1]]
                enc, _ = fn.readers.file(files=files, random_shuffle=False, name="reader")
                rest = list(ext)
            else:
                enc, rest = ext[0], list(ext[1:])
            if train:
                anchor, shape, roi_start, roi_end = rest
                img = fn.decoders.image_slice(enc, anchor, shape, normalized_anchor=False, normalized_shape=False, **dec_kw)
                img = fn.resize(
                    img,
                    resize_x=s,
                    resize_y=s,
                    roi_start=roi_start,
                    roi_end=roi_end,
                    roi_relative=True,
                    **rs_kw,
                )
            else:
                rw, rh, anchor = rest
                img = fn.decoders.image(enc, **dec_kw)
                img = fn.resize(img, resize_x=rw, resize_y=rh, **rs_kw)
                img = fn.slice(img, anchor, np.array([s, s], np.float32), normalized_anchor=False, normalized_shape=False)
            return img

        p = pipe()
        p.build()
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
    def _batches(self, epoch, start):
        step = start
        while step < self.steps_per_epoch:
            plan = self._plan(epoch, step)
            pipe = self._build(epoch, plan)
            try:
                for k, (orig, use, n_valid) in enumerate(plan):
                    try:
                        (out,) = pipe.run()
                    except Exception:  # a decode error inside DALI: find it, substitute, rebuild here
                        # prefetching may surface a later batch's error: search the batches in flight
                        ahead = [j for _, u, _ in plan[k : k + self.prefetch + 1] for j in u]
                        if not self._find_culprits(ahead):
                            raise
                        break
                    imgs = self._to_torch(out)[:n_valid]
                    self._note_substitutions(orig[:n_valid])
                    step += 1
                    labels = torch.tensor([self.source.labels[j] for j in use[:n_valid]], dtype=torch.int64)
                    yield self._finish(imgs, labels)
            finally:
                del pipe

    def _note_substitutions(self, orig) -> None:
        if self._known_bad:
            self._record_bad([(self.source.names[i], self._known_bad[i]) for i in orig if i in self._known_bad])
