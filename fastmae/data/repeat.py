"""Repeated sampling (``repeat_samples=K``): decode each file once, emit K independent crops and flips.

The MAE spatiotemporal paper's lever for video (decode once, several augmented clips) applied to images:
the decode is paid once for K training samples. Sample ids are ``file * K + k``; crop and flip of each
are drawn from its own (seed, epoch, sample id) stream, so the K crops are independent, and each crop
gets its own mask in the step (masks are drawn per batch row). With K = 1 the draws equal the plain loader's.

What counts is samples, not files: an epoch is K x files samples, ``steps_per_epoch`` (and with it the
learning-rate schedule, ``--epochs`` and the resume position) counts batches of samples. The K samples
of a file sit in the same batch (the batch size must be a multiple of K); files are shuffled per epoch
and sharded by rank exactly as the plain loader shuffles samples.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .augment import color_jitter, pil_apply
from .decode import decode_crops
from .loader import ImageDataset, TorchLoader, rank_indices
from .sources import Source
from .text import printable

__all__ = ["RepeatDataset", "RepeatLoader"]


class RepeatDataset(ImageDataset):
    """Keys per file: ``(file, epoch, K sample ids, K windows)`` -> (uint8 (K, S, S, 3), label, bad list)."""

    def __init__(self, src: Source, img_size: int, augment: str, seed: int, decode: str, repeat: int) -> None:
        super().__init__(src, img_size, augment, seed, decode)
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.src) * self.repeat

    def batch_keys(self, epoch: int, indices: np.ndarray) -> list:
        ids = np.asarray(indices, dtype=np.int64).reshape(-1, self.repeat)
        files = ids[:, 0] // self.repeat
        rows = self.params(epoch, ids.reshape(-1), np.repeat(files, self.repeat)).reshape(len(files), self.repeat, -1)
        return [(int(f), epoch, i.tolist(), r.tolist()) for f, i, r in zip(files, ids, rows, strict=True)]

    def load_k(self, j: int, epoch: int, ids: list[int], rows) -> np.ndarray:
        data = self.src.read_bytes(j)
        if self.fast:
            out = decode_crops(data, rows, self.img_size).numpy()
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                out = np.stack([pil_apply(im, self.img_size, True, r) for r in rows])
        if self.augment == "crop_color":
            out = np.stack([color_jitter(o, self.seed, epoch, i) for o, i in zip(out, ids, strict=True)])
        return out

    def __getitem__(self, key):
        f, epoch, ids, rows = key
        bad, n = [], len(self.src)
        for step in range(n):
            j = (f + step) % n
            if step:  # a substitute file: the failed samples' draws on its size
                rows = self.params(epoch, ids, [j] * len(ids)).tolist()
            try:
                return self.load_k(j, epoch, ids, rows), self.src.labels[j], bad
            except Exception as e:  # any decode failure: substitute deterministically, keep training
                bad.append((self.src.names[j], f"decode failed ({type(e).__name__}: {str(e)[:80]})"))
        raise RuntimeError(f"no decodable image left in {printable(self.src.root)}")

    def collate(self, items):
        imgs = torch.from_numpy(np.concatenate([it[0] for it in items]))
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64).repeat_interleave(self.repeat)
        return imgs, labels, [b for it in items for b in it[2]]


class RepeatLoader(TorchLoader):
    """The torch loader over :class:`RepeatDataset`: epochs of K x files samples, K consecutive per file."""

    def __init__(self, src: Source, repeat: int, *, augment: str, decode: str, batch_size: int, drop_last: bool,
                 train: bool, **kw) -> None:
        if augment in ("finetune", "eval", "none") or not train:
            raise ValueError(f"repeat_samples > 1 needs random crops for training (augment {augment!r}, train {train})")
        if batch_size % repeat or not drop_last:
            raise ValueError(f"repeat_samples={repeat} needs a batch size that is a multiple of it (got {batch_size}) "
                             "and drop_last")
        dataset = RepeatDataset(src, kw["img_size"], augment, kw["seed"], decode, repeat)
        super().__init__(dataset, classes=src.classes, skipped=src.bad, batch_size=batch_size, drop_last=drop_last,
                         train=train, **kw)
        self.repeat = repeat
        self.num_files = len(src)
        self.steps_per_epoch = len(self._files(0)) * repeat // batch_size
        self.num_valid = self.steps_per_epoch * batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(src)} files give no full batch of {batch_size} samples at repeat_samples={repeat}")

    def _files(self, epoch: int) -> np.ndarray:
        return rank_indices(self.num_files, epoch=epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                            world_size=self.world_size, batch_size=self.batch_size // self.repeat, drop_last=True)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        files = self._files(epoch)
        return (files[:, None] * self.repeat + np.arange(self.repeat)).reshape(-1)

    def state_dict(self):
        return {**super().state_dict(), "repeat_samples": self.repeat}

    def load_state_dict(self, sd) -> None:
        if int(sd.get("repeat_samples", 1)) != self.repeat:
            raise ValueError(f"loader state was saved with repeat_samples={sd.get('repeat_samples', 1)} but this loader "
                             f"has repeat_samples={self.repeat}; the saved position would address different samples")
        super().load_state_dict(sd)
