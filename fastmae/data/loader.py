"""Loaders behind one interface: ``torch`` (PIL workers), ``dali`` (see ``dali.py``), ``synthetic``.

Position and resume. A loader's position is ``(epoch, step)``: ``step`` counts the batches of ``epoch``
already *yielded* (prefetched batches do not count). Iterating starts at the current position and
yields only the remaining batches of that epoch; the per-rank sample order of an epoch is a pure
function of ``(seed, epoch)``, and the augmentation of every sample a pure function of
``(seed, epoch, index)``, so ``load_state_dict(state_dict())`` followed by iteration yields exactly the
batches an uninterrupted run would have produced next, bit for bit, for any worker count.

Epoch changes: ``set_epoch(e)`` moves to ``(e, 0)``, except right after ``load_state_dict`` for the
same epoch, where it keeps the restored step (so an engine that calls ``set_epoch`` at the start of
every epoch, including the resumed one, still resumes mid-epoch). Iterating a loader whose epoch is
exhausted without calling ``set_epoch`` first moves it to ``(epoch + 1, 0)``, so a bare
``for epoch ...: for batch in loader`` loop still reshuffles every epoch.

Bad files (one meaning for image and video loaders): ``bad_files`` lists ``(path, reason)`` for every
distinct file left out - first the scan's finds, then files that passed the scan but failed to decode
at runtime, each listed once; ``bad_count`` is ``len(bad_files)``. ``substitutions`` counts the runtime
replacements performed (a bad file visited in three epochs counts three times).

Sharding: the epoch permutation of all N samples is split round-robin over ``world_size`` ranks after
truncating it to a multiple of ``world_size`` (``drop_last=True``; the same few samples are left out of
every rank), or padding it by wrap-around (``drop_last=False``). Each rank then drops its last partial
batch (``drop_last=True``), so ``steps_per_epoch`` is exact, equal on all ranks and known upfront.

Validity (``drop_last=False``, for evaluation): the wrap-around padding keeps every rank at the same
number of equally shaped batches (collectives stay in step), and its samples come out with label
``-1``; every real sample is yielded by exactly one rank with its true label. Count ``labels >= 0``
(e.g. ``cross_entropy(..., ignore_index=-1)``). ``num_valid`` is this rank's real samples per epoch.
(Tar samples without a ``.cls`` member are also ``-1``; evaluation loaders pass ``require_labels=True``.)
"""

from __future__ import annotations

import io
import math
import random
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..reference import normalize_uint8
from .augment import (
    AUGMENT_SCALES,
    color_jitter,
    epoch_permutation,
    eval_params,
    fixed_crop_params_batch,
    pil_apply,
    sample_seed,
    train_params_batch,
)
from .decode import decode_crops
from .image_io import MAX_PIXELS, convert
from .sources import Source
from .text import printable

__all__ = [
    "BaseLoader",
    "TorchLoader",
    "SyntheticLoader",
    "ImageDataset",
    "rank_indices",
    "rank_valid_count",
    "finetune_transform",
    "seeded_global_rngs",
]


def rank_indices(
    n: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int, batch_size: int, drop_last: bool
) -> np.ndarray:
    """Global sample indices this rank visits in ``epoch``, in order. Length = its samples this epoch."""
    order = epoch_permutation(seed, epoch, n) if shuffle else np.arange(n)
    if drop_last:
        per_rank = n // world_size
        mine = order[: per_rank * world_size][rank::world_size]
        return mine[: (per_rank // batch_size) * batch_size]
    per_rank = math.ceil(n / world_size)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats from the start
    return padded[rank::world_size]


def rank_valid_count(n: int, *, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """How many of this rank's ``rank_indices`` are real samples; the rest (a suffix) is padding."""
    if drop_last:
        return (n // world_size) // batch_size * batch_size
    return max(0, -(-(n - rank) // world_size))


def steps_for(n: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return (n // world_size) // batch_size
    return math.ceil(math.ceil(n / world_size) / batch_size)


class BaseLoader:
    """Position bookkeeping, sharding plan and output conversion shared by all loaders."""

    kind = "base"
    holdout_fraction = 0.0  # > 0: this split was carved from the training files (no val/ split; build_loader)
    source = None  # the scanned file table (a data.sources.Source) of file-based loaders; set by build_loader

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        img_size: int,
        output: str,
        train: bool,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        device: str | torch.device,
        drop_last: bool,
        classes: list[str],
        skipped: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.img_size = img_size
        self.output = output
        self.train = train
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.steps_per_epoch = steps_for(num_samples, world_size, batch_size, drop_last)
        self.num_valid = rank_valid_count(
            num_samples, rank=rank, world_size=world_size, batch_size=batch_size, drop_last=drop_last
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples give no full batch: world_size {world_size} x batch_size {batch_size} "
                "is larger than the dataset (use a smaller batch or drop_last=False)"
            )
        # (path, reason) of every file left out: first the scan's finds, then decode failures met at runtime
        self.bad_files: list[tuple[str, str]] = list(skipped)
        self.substitutions = 0  # runtime replacements performed (a bad file counts once per visit)
        self._bad_seen: set[str] = {p for p, _ in self.bad_files}
        self._epoch = 0
        self._step = 0
        self._restored = False
        self._mean = self._std = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def bad_count(self) -> int:
        """Distinct files left out so far (scan + runtime): ``len(bad_files)``."""
        return len(self.bad_files)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if self._restored and epoch == self._epoch:
            return
        self._restored = False
        self._epoch, self._step = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "world_size", "num_samples"):
            if key in sd and int(sd[key]) != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={sd[key]} but this loader has {key}={getattr(self, key)}; "
                    "the saved position would address different samples"
                )
        step = int(sd["step"])
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"loader state step {step} outside [0, {self.steps_per_epoch}]")
        self._epoch, self._step = int(sd["epoch"]), step
        self._restored = True

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return rank_indices(
            self.num_samples,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        self._restored = False
        epoch, start = self._epoch, self._step
        for imgs, labels in self._batches(epoch, start):
            real = self.num_valid - self._step * self.batch_size
            if real < len(labels):  # wrap-around padding (drop_last=False): marked, never counted
                labels = labels.clone()
                labels[max(real, 0) :] = -1
            self._step += 1
            yield imgs, labels

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _record_bad(self, items) -> None:
        for path, reason in items:
            self.substitutions += 1
            if path not in self._bad_seen:
                self._bad_seen.add(path)
                self.bad_files.append((path, reason))

    def _finish(self, u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: images uint8 (N, H, W, 3) -> as is, or normalized float32 (N, 3, H, W);
        clips uint8 (N, T, H, W, 3) -> as is, or normalized float32 (N, 3, T, H, W); float32 images
        (already normalized by the transform, ``augment="finetune"``) -> as is."""
        if u8.device != self.device:
            u8 = u8.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if self.output == "uint8" or u8.is_floating_point():
            return u8, labels
        if self._mean is None:
            self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device)
            self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device)
        if u8.dim() == 5:
            n, t = u8.shape[:2]
            x = normalize_uint8(u8.flatten(0, 1), self._mean, self._std)  # (N*T, 3, H, W)
            return x.unflatten(0, (n, t)).transpose(1, 2).contiguous(), labels
        return normalize_uint8(u8, self._mean, self._std).contiguous(), labels


def finetune_transform(img_size: int):
    """timm's fine-tuning transform with the official MAE fine-tuning settings: RandomResizedCrop
    (0.08-1, bicubic) + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (pixel mode,
    one box), normalized with ImageNet mean/std. PIL image -> float32 (3, img_size, img_size)."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=img_size,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    # At magnitude 10 (m9 + noise, clipped) timm's PosterizeIncreasing asks for 0 bits, which Pillow >= 13 rejects
    # (older Pillow returned a black image): cap that op alone just below 10, so it keeps 1 bit; the others are as timm.
    for stage in transform.transforms:
        for op in getattr(stage, "ops", ()):
            if op.name.startswith("Posterize"):
                op.magnitude_max = 9.99
    return transform


@contextmanager
def seeded_global_rngs(seed: int):
    """Seed the generators timm's transforms draw from - python ``random`` (crop, RandAugment magnitudes,
    erasing boxes), numpy's global RNG (RandAugment's op choice) and torch's CPU generator (flip, erasing
    noise) - so a sample's augmentation is a pure function of its seed, then restore them: with
    ``num_workers=0`` this runs in the training process, whose generators draw the masks."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.default_generator.set_state(th)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style image dataset: ``batch_keys(epoch, indices)`` (main process) -> keys; ``dataset[key]``
    (a worker) -> (uint8 HWC, or float32 CHW for ``augment="finetune"``, label, bad list).

    The contract of every dataset :class:`TorchLoader` drives (images here, clips in ``video.py``).
    Crop windows of a whole batch are drawn in the main process in one vectorized call from the
    scanned image sizes, the same call the DALI loader makes; a worker draws one itself only for a
    substitute (a file that failed to decode), from the failed sample's stream."""

    def __init__(self, src: Source, img_size: int, augment: str, seed: int, decode: str = "pil") -> None:
        self.src, self.img_size, self.augment, self.seed = src, img_size, augment, seed
        # "fast": train crops through data.decode (torch's uint8 resize; within a stated PSNR of PIL's)
        self.fast = decode == "fast" and augment not in ("finetune", "eval", "none")
        self.sizes = np.asarray(src.sizes, dtype=np.int64).reshape(-1, 2)
        self.finetune = finetune_transform(img_size) if augment == "finetune" else None

    def __len__(self) -> int:
        return len(self.src)

    def params(self, epoch: int, orig, use) -> np.ndarray:
        """int64 (N, 5) train windows or (N, 4) eval geometry for samples ``orig`` decoded from files ``use``."""
        wh = self.sizes[np.asarray(use, dtype=np.int64)]
        if self.augment in ("eval", "none"):
            return np.array([eval_params(int(w), int(h), self.img_size) for w, h in wh], dtype=np.int64).reshape(-1, 4)
        if self.augment == "crop":
            return fixed_crop_params_batch(self.seed, epoch, orig, wh[:, 0], wh[:, 1])
        return train_params_batch(self.seed, epoch, orig, wh[:, 0], wh[:, 1], AUGMENT_SCALES[self.augment])

    def batch_keys(self, epoch: int, indices: np.ndarray) -> list:
        if self.finetune is not None:
            return [(i, epoch, None) for i in indices.tolist()]
        rows = self.params(epoch, indices, indices).tolist()
        return [(i, epoch, row) for i, row in zip(indices.tolist(), rows, strict=True)]

    def load(self, j: int, epoch: int, idx: int, params) -> np.ndarray:
        """File ``j`` as sample ``idx`` of ``epoch``: uint8 (S, S, 3), or float32 (3, S, S) for finetune."""
        if self.fast:
            if params is None or j != idx:
                params = self.params(epoch, [idx], [j])[0].tolist()
            out = decode_crops(self.src.read_bytes(j), [params], self.img_size)[0].numpy()
            return color_jitter(out, self.seed, epoch, idx) if self.augment == "crop_color" else out
        with Image.open(io.BytesIO(self.src.read_bytes(j))) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:  # a decompression bomb that passed the header scan
                raise ValueError(f"{im.size[0]}x{im.size[1]} pixels is more than the limit of {MAX_PIXELS}")
            im.load()
            if self.finetune is not None:
                with seeded_global_rngs(sample_seed(self.seed, epoch, idx)):
                    return self.finetune(convert(im, "RGB")).numpy()
            if params is None or j != idx:
                params = self.params(epoch, [idx], [j])[0].tolist()
            out = pil_apply(im, self.img_size, self.augment not in ("eval", "none"), params)
            return color_jitter(out, self.seed, epoch, idx) if self.augment == "crop_color" else out

    def __getitem__(self, key):
        idx, epoch, params = key
        bad = []
        n = len(self.src)
        for k in range(n):
            j = (idx + k) % n
            try:
                img = self.load(j, epoch, idx, params)
                # An evaluation sample that failed to decode is scored by nobody: its stand-in keeps the batch
                # shape but carries the ignore label, so it never counts in top-1 or in the number of images scored.
                label = -1 if bad and self.augment == "eval" else self.src.labels[j]
                return img, label, bad
            except Exception as e:  # any decode failure: substitute deterministically, keep training
                bad.append((self.src.names[j], f"decode failed ({type(e).__name__}: {str(e)[:80]})"))
        raise RuntimeError(f"no decodable image left in {printable(self.src.root)}")


def _collate(items):
    imgs = torch.from_numpy(np.stack([it[0] for it in items]))
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    bad = [b for it in items for b in it[2]]
    return imgs, labels, bad


class _PlanSampler:
    """Batch sampler whose plan (this rank's order, epoch, first step) is set by the loader before each
    iteration; it lives in the main process and yields each batch's keys (``dataset.batch_keys``) lazily."""

    def __init__(self, dataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.indices = np.zeros(0, dtype=np.int64)
        self.epoch = self.start = self.stop = 0

    def __iter__(self):
        bs, e = self.batch_size, self.epoch
        for s in range(self.start, self.stop):
            yield self.dataset.batch_keys(e, self.indices[s * bs : (s + 1) * bs])

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_context():
    """How DataLoader workers start. Forking is the fast default, but a child forked while DALI's
    thread pools run (a DALI pipeline lives as long as its loader) can hang or crash; once DALI is
    loaded in this process, workers start from a fork server instead (a fresh interpreter with torch
    and the datasets preloaded; a few seconds once per process)."""
    import multiprocessing as mp
    import sys

    if "nvidia.dali" not in sys.modules:
        return None
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "fastmae.data.loader", "fastmae.data.video"])
    return ctx


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: preemption (SIGTERM to the process group) is the main process's to
    handle; a worker that died of it would abort the final save. Workers end with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(BaseLoader):
    """A torch DataLoader over a dataset addressed by ``(index, epoch)`` (images or clips), with workers."""

    kind = "torch"

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        classes: list[str],
        skipped: Iterable[tuple[str, str]] = (),
        num_workers: int = 2,
        prefetch_factor: int = 2,
        **kw,
    ) -> None:
        super().__init__(num_samples=len(dataset), classes=classes, skipped=skipped, **kw)
        self.dataset = dataset
        self._sampler = _PlanSampler(self.dataset, self.batch_size)
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
        self._workers_started = False
        self._dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=getattr(dataset, "collate", _collate),  # a dataset may batch its own items (data.repeat)
            worker_init_fn=ignore_sigterm,
            pin_memory=self.device.type == "cuda",
            # A private generator: DataLoader otherwise draws its worker base seed from the global RNG on
            # every iter(), which would shift the training masks and break bit-exact resume.
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def _batches(self, epoch, start):
        sp = self._sampler
        sp.indices, sp.epoch, sp.start, sp.stop = self.epoch_indices(epoch), epoch, start, self.steps_per_epoch
        if self._dl.num_workers > 0 and not self._workers_started:
            self._dl.multiprocessing_context = _worker_context()  # decided when the (persistent) workers start
            self._workers_started = True
        for imgs, labels, bad in self._dl:
            if bad:
                self._record_bad(bad)
            yield self._finish(imgs, labels)


class SyntheticLoader(BaseLoader):
    """Device-resident random images (or clips of ``num_frames``) generated once; every step yields the
    same tensors (compute only)."""

    kind = "synthetic"

    def __init__(self, *, num_samples: int = 1024, num_classes: int = 1000, num_frames: int = 0, **kw) -> None:
        super().__init__(num_samples=num_samples, classes=[str(i) for i in range(num_classes)], **kw)
        self.dataset = None
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.rank)
        frames = (num_frames,) if num_frames else ()
        shape = (self.batch_size, *frames, self.img_size, self.img_size, 3)
        u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (self.batch_size,), dtype=torch.int64, generator=g)
        self._batch = self._finish(u8, labels)

    def _batches(self, epoch, start):
        last = self.num_samples_this_rank() - (self.steps_per_epoch - 1) * self.batch_size
        for s in range(start, self.steps_per_epoch):
            if s == self.steps_per_epoch - 1 and last < self.batch_size:
                yield self._batch[0][:last], self._batch[1][:last]
            else:
                yield self._batch

    def num_samples_this_rank(self) -> int:
        return len(self.epoch_indices(0))
