"""``decode="dali_roi"``: the torch loader's workers decode only each training crop's window with DALI's CPU
ROI decoder (libjpeg-turbo, ``fn.decoders.image_slice``) and resize it with torch's uint8 bicubic-antialias
kernel (:func:`fastmae.data.decode.resize_flip`).

The fastest exact CPU path measured (``bench/RESULTS.md``, "Data path"): a crop of 0.2-1 of the image skips the
rows and most of the columns outside it, and no pixel leaves uint8. Each worker process holds one DALI
pipeline (one thread: the workers are the parallelism), built on its first batch and fed a whole batch
per run through ``__getitems__``, so DALI's per-run overhead is paid once per batch.

Pixels: libjpeg-turbo's ROI decode returns the same pixels as a full PIL decode cropped to the window, and
the resize is the ``fast`` path's, so a sample is bit-identical to ``decode="fast"`` without DCT scaling
and within :data:`~fastmae.data.decode.PSNR_FLOOR_RESIZE` dB of the PIL path on the same window
(``tests/test_dali_roi.py``). A batch with a file DALI cannot decode is redone sample by sample, and the
bad file is substituted under the torch loader's rule (the next decodable index, the failed sample's draws).
"""

from __future__ import annotations

import numpy as np
import torch

from .augment import color_jitter
from .decode import resize_flip
from .image_io import MAX_PIXELS
from .loader import ImageDataset
from .sources import Source

__all__ = ["RoiDecoder", "RoiDataset"]


class RoiDecoder:
    """A one-thread DALI CPU pipeline: encoded files + (left, top, w, h) windows -> uint8 HWC crops."""

    def __init__(self, max_batch: int) -> None:
        from .dali import import_dali

        fn, pipeline_def, types = import_dali()

        # Not pipelined, not asynchronous: each call feeds one batch and waits for it, in the worker's own thread.
        @pipeline_def(batch_size=max_batch, num_threads=1, device_id=None, exec_pipelined=False, exec_async=False)
        def pipe():
            enc = fn.external_source(name="enc")
            anchor = fn.external_source(name="anchor")
            shape = fn.external_source(name="shape")
            return fn.decoders.image_slice(enc, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                           output_type=types.RGB, device="cpu")

        self.max_batch = max_batch
        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, datas: list[bytes], windows: np.ndarray) -> list[np.ndarray]:
        windows = np.asarray(windows, dtype=np.float32).reshape(-1, 5)
        p = self.pipe
        p.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        p.feed_input("anchor", list(windows[:, 0:2]))
        p.feed_input("shape", list(windows[:, 2:4]))
        (out,) = p.run()
        return [np.asarray(t) for t in out]


class RoiDataset(ImageDataset):
    """:class:`ImageDataset` whose train crops come from DALI's CPU ROI decode + torch's uint8 resize."""

    def __init__(self, src: Source, img_size: int, augment: str, seed: int, max_batch: int) -> None:
        if augment in ("finetune", "eval", "none"):
            raise ValueError(f"decode='dali_roi' decodes random training crops; augment {augment!r} has none")
        super().__init__(src, img_size, augment, seed, "pil")
        self.max_batch = max_batch
        self._decoder: RoiDecoder | None = None

    def __getstate__(self) -> dict:
        # A DALI pipeline does not cross process boundaries: each worker builds its own on first use.
        return {**self.__dict__, "_decoder": None}

    def _crops(self, datas: list[bytes], windows: np.ndarray, epoch: int, ids) -> list[np.ndarray]:
        if self._decoder is None:
            self._decoder = RoiDecoder(self.max_batch)
        try:
            crops = self._decoder(datas, windows)
        except Exception as e:
            self._decoder = None  # a failed run leaves DALI's fed inputs behind: the next call builds afresh
            # DALI's message spans lines ("Critical error in pipeline:\nError in CPU operator ..."): one line for bad_files
            raise RuntimeError(" ".join(str(e).split())) from None
        out = []
        for crop, w, i in zip(crops, np.asarray(windows).tolist(), ids, strict=True):
            x = resize_flip(torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0), self.img_size, w[4])
            x = x.contiguous().numpy()
            out.append(color_jitter(x, self.seed, epoch, i) if self.augment == "crop_color" else x)
        return out

    def load(self, j: int, epoch: int, idx: int, params) -> np.ndarray:
        w, h = (int(v) for v in self.sizes[j])
        if w * h > MAX_PIXELS:  # a decompression bomb that passed the header scan
            raise ValueError(f"{w}x{h} pixels is more than the limit of {MAX_PIXELS}")
        if params is None or j != idx:
            params = self.params(epoch, [idx], [j])[0].tolist()
        return self._crops([self.src.read_bytes(j)], np.asarray([params]), epoch, [idx])[0]

    def __getitems__(self, keys: list) -> list:
        """A batch in one DALI run; any failure (an unreadable or undecodable file, a bomb) redoes the batch
        sample by sample through ``__getitem__``, which substitutes the bad file."""
        ids = [k[0] for k in keys]
        try:
            if (self.sizes[ids].prod(axis=1) > MAX_PIXELS).any():
                raise ValueError("a file above the pixel limit")
            imgs = self._crops([self.src.read_bytes(i) for i in ids], np.asarray([k[2] for k in keys]), keys[0][1], ids)
        except Exception:  # the per-sample path names the file and substitutes it
            return [self[k] for k in keys]
        return [(img, self.src.labels[i], []) for img, i in zip(imgs, ids, strict=True)]
