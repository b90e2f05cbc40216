"""Supervised evaluation of an encoder: linear probe, partial and full fine-tuning (MAE protocols).

- ``tune_blocks = 0`` (linear probe): frozen encoder, cls feature (or global
  pool), ``BatchNorm1d(affine=False, eps=1e-6)`` + linear head, LARS. The
  frozen features are computed under ``torch.no_grad`` (bf16 autocast at scale)
  in every step, so the probe sees the loader's augmentation.
- ``tune_blocks = k > 0``: the last k blocks, the final norm and the head train;
  the frozen prefix runs under ``no_grad`` (no activations kept for backward).
- ``tune_blocks < 0`` (or >= depth): full fine-tuning. AdamW with layer-wise lr
  decay, drop path, label smoothing, mixup/cutmix (timm ``Mixup`` and
  ``SoftTargetCrossEntropy``).

lr = blr * effective batch / 256 (effective batch = batch_size x ranks x
accum_iter, accumulation chosen from ``eff_batch_size``), linear warmup then
half-cosine per iteration. Top-1/top-5 on the validation data after every epoch,
each rank scoring its shard and the counts all-reduced (no sample counted twice
or dropped). The headline number is the last epoch's, or, with ``val_fraction``
(digits), the test accuracy at the epoch chosen on a validation split carved
from the training data; never the best epoch picked on the test split.

Training runs through pretraining's engine (``fastmae.engine``): the step
(``train_step`` over a loss of (images, labels)), the checkpointed ``TrainState``,
the resume path that skips a damaged newest checkpoint with a warning, the
preemption vote (SIGTERM to any rank: every rank saves at the same step and
exits 0), the run-folder lock, the log window and its one host sync. torchrun
DDP (gloo on CPU), autocast, optional ``torch.compile``, no host syncs in the
step. The linear probe on in-memory data (no augmentation) computes the frozen
features once and trains the head on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    check_position,
    find_resume_checkpoint,
    list_checkpoints,
    remove_partial_writes,
)
from fastmae.engine.distributed import DistInfo, all_reduce_mean, init_distributed, shutdown
from fastmae.engine.logger import RunLogger
from fastmae.engine.optim import lr_at
from fastmae.engine.preemption import Preemption
from fastmae.engine.runlock import RunLock
from fastmae.engine.state import TrainState
from fastmae.engine.step import LogWindow, StepStats, resolve_precision, train_step
from fastmae.eval.data import IGNORE, LabelledSplit, TensorLoader, carve_validation, load_digits_split, stream_loaders
from fastmae.eval.models import build_encoder, read_source, resolve_arch
from fastmae.eval.optim import adamw_layer_decay, lars
from fastmae.models.vit import VisionTransformer

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DEMO_DATA = ("", "digits")


@dataclass
class EvalConfig:
    preset: str = "digits"
    ckpt: str = "random"  # a fastmae/official checkpoint path, or "random" (the baseline)
    # data: "" (the embedded digits), ROOT with train/ and val/, or the two splits separately
    data: str = ""
    train_data: str = field(default="", metadata={
        "help": "training split: class folders or tar shards 'train-{000..099}.tar' (label in .cls)"})
    val_data: str = field(default="", metadata={"help": "validation split (class folders or tar shards); goes with --train_data"})
    loader: str = "torch"  # torch | dali
    num_workers: int = 4
    augment: str = field(default="auto", metadata={
        "help": "training augmentation: auto (the protocol's) | mae | linprobe | finetune (RandAugment) | eval"})
    test_fraction: float = 0.25  # digits: held-out test split
    val_fraction: float = field(default=0.0, metadata={
        "help": "digits: share of the training split held out to choose the reported epoch (0 = last epoch)"})
    output_dir: str = "runs/eval"
    seed: int = 0
    device: str = "auto"
    resume: str = ""  # "" | auto (latest checkpoint in output_dir) | a checkpoint path
    eval_only: bool = field(default=False, metadata={
        "help": "score a trained classifier (--ckpt) on the validation data, no training"})
    # architecture: 0 = from the checkpoint (random init: the digits demo encoder)
    img_size: int = 0
    patch_size: int = 0
    in_chans: int = 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # protocol
    tune_blocks: int = -1  # 0 = linear probe, k = last k blocks, -1 = all
    global_pool: bool = False
    learn_pos_embed: bool = False  # full fine-tuning only: train the (sin-cos initialized) position table
    epochs: int = 50
    warmup_epochs: float = 5.0
    batch_size: int = 128  # per device
    eff_batch_size: int = field(default=0, metadata={
        "help": "effective batch reached by gradient accumulation; 0 = batch_size x ranks"})
    eval_batch_size: int = 512
    blr: float = 1e-3
    lr: float = 0.0  # absolute lr; 0 = blr * effective batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    # fine-tuning only
    layer_decay: float = 0.75
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    # linear probe only (LARS)
    momentum: float = 0.9
    # step
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    # logging and checkpoints
    log_every: int = 50
    max_bad_steps: int = 10  # consecutive non-finite losses before aborting
    ckpt_every: int = 0  # optimizer steps; 0 = at the end of every epoch only
    keep_ckpts: int = 2
    save_ckpt: bool = True
    progress: bool = True
    quiet: bool = False

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        checks = [
            (self.device in DEVICES or self.device.startswith("cuda:"), f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.loader in ("torch", "dali"), f"loader must be torch or dali, got {self.loader!r}"),
            (self.augment in ("auto", "mae", "linprobe", "finetune", "eval"),
             f"augment must be auto, mae, linprobe, finetune or eval, got {self.augment!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.eff_batch_size >= 0, f"eff_batch_size must be >= 0, got {self.eff_batch_size}"),
            (self.eval_batch_size > 0, f"eval_batch_size must be positive, got {self.eval_batch_size}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 < self.layer_decay <= 1.0, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (0.0 <= self.smoothing < 1.0, f"smoothing must be in [0, 1), got {self.smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.max_bad_steps > 0, f"max_bad_steps must be positive, got {self.max_bad_steps}"),
            (self.log_every > 0 and self.ckpt_every >= 0 and self.keep_ckpts > 0,
             "log_every and keep_ckpts must be positive, ckpt_every >= 0"),
            (min(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth, self.num_heads) >= 0,
             "architecture sizes must be >= 0 (0 = from the checkpoint)"),
            (not (self.data and (self.train_data or self.val_data)), "give --data=ROOT or --train_data/--val_data, not both"),
            (bool(self.train_data) == bool(self.val_data), "--train_data and --val_data go together"),
            (not (self.resume and not self.output_dir), "resume needs an output_dir"),
        ]
        for ok, reason in checks:
            if not ok:
                raise ValueError(reason)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, got {self.batch_size}")
        if self.val_fraction > 0 and not self.is_demo:
            raise ValueError("val_fraction carves the digits demo's training split; at scale the last epoch is reported")

    @property
    def protocol(self) -> str:
        return "linprobe" if self.tune_blocks == 0 else ("finetune" if self.tune_blocks < 0 else "partial")

    @property
    def is_demo(self) -> bool:
        return self.data in DEMO_DATA and not self.train_data


# ---- model ------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A ViT classifier whose first ``start`` blocks (and the embeddings, unless ``start == 0``) are frozen.

    The frozen prefix runs under ``no_grad`` and in eval mode (no drop path), so it
    keeps no activations for backward. ``start = depth`` is the linear probe.
    """

    def __init__(self, vit: VisionTransformer, start: int):
        super().__init__()
        self.vit = vit
        self.start = start

    def forward(self, imgs: Tensor) -> Tensor:
        vit = self.vit
        _, grid = vit.check_images(imgs)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.start == 0):
            x = vit.embed_patches(imgs, None, grid)
            for blk in vit.blocks[: self.start]:
                x = blk(x)
        for blk in vit.blocks[self.start :]:
            x = blk(x)
        if not vit.global_pool:
            x = vit.norm(x)
        return vit.forward_head(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.start > 0:
            self.vit.patch_embed.eval()
            for blk in self.vit.blocks[: self.start]:
                blk.eval()
        return self


def freeze_for(model: VisionTransformer, tune_blocks: int, learn_pos_embed: bool = False) -> int:
    """Set requires_grad for the protocol; returns the first trainable block (depth for the linear probe).

    Linear probe: the head only. Partial: the last k blocks, the final norm (or fc_norm) and the head.
    """
    depth = len(model.blocks)
    start = depth if tune_blocks == 0 else (0 if tune_blocks < 0 or tune_blocks >= depth else depth - tune_blocks)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            trainable = learn_pos_embed and start == 0
        elif tune_blocks == 0:
            trainable = name.startswith("head.")
        else:
            trainable = start == 0 or name.startswith(("head.", "norm.", "fc_norm.")) or (
                name.startswith("blocks.") and int(name.split(".")[1]) >= start)
        p.requires_grad_(trainable)
    return start


def build_classifier(arch: dict, sd: dict | None, num_classes: int, *, tune_blocks: int, global_pool: bool,
                     drop_path: float, learn_pos_embed: bool, mean, std, head_sd: bool = False) -> tuple[VisionTransformer, int]:
    """The encoder with a fresh head for the protocol (BN + linear for the probe), frozen as the protocol says.

    ``head_sd``: ``sd`` is a trained classifier (``eval_only``): it loads whole, head included.
    """
    linprobe = tune_blocks == 0
    vit = build_encoder(arch, None if head_sd else sd, num_classes=num_classes, global_pool=global_pool,
                        drop_path_rate=0.0 if linprobe else drop_path, learn_pos_embed=learn_pos_embed,
                        pixel_mean=mean, pixel_std=std)
    with torch.no_grad():
        if linprobe:
            # MAE's probe head: BN without affine whitens the features, then a linear layer.
            nn.init.trunc_normal_(vit.head.weight, std=0.01)
            nn.init.zeros_(vit.head.bias)
            vit.head = nn.Sequential(nn.BatchNorm1d(vit.embed_dim, affine=False, eps=1e-6), vit.head)
        else:
            nn.init.trunc_normal_(vit.head.weight, std=2e-5)
            nn.init.zeros_(vit.head.bias)
    if head_sd:
        from fastmae.convert import load_into

        load_into(vit, sd, strict=True)
    return vit, freeze_for(vit, tune_blocks, learn_pos_embed)


# ---- data -------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    train: object  # a fastmae.data loader (or TensorLoader): (imgs, labels) batches
    val: object  # validation batches, padding labelled IGNORE
    select: object | None  # digits with val_fraction: the validation split carved from training
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_val: int
    kind: str
    score: Callable[[nn.Module], nn.Module] | None = None  # validation-time wrapper, e.g. multi-view averaging


def build_data(cfg: EvalConfig, arch: dict, info: DistInfo, split: LabelledSplit | None) -> EvalData:
    if cfg.is_demo:
        if split is None:
            split = load_digits_split(arch["img_size"], arch["in_chans"], cfg.test_fraction, cfg.seed)
        elif split.img_size != arch["img_size"] or split.in_chans != arch["in_chans"]:
            raise ValueError(f"data is {split.in_chans}x{split.img_size}px but the encoder takes "
                             f"{arch['in_chans']}x{arch['img_size']}px")
        x, y, select = split.train_x, split.train_y, None
        kw = dict(seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=info.device, classes=split.classes)
        if cfg.val_fraction > 0:
            x, y, vx, vy = carve_validation(x, y, cfg.val_fraction, cfg.seed)
            select = TensorLoader(vx, vy, batch_size=cfg.eval_batch_size, train=False, **kw)
        if len(y) < cfg.batch_size * info.world_size:
            raise ValueError(f"the training split has {len(y)} images, fewer than one batch of {cfg.batch_size} "
                             f"per rank (the last partial batch is dropped): lower batch_size or add images")
        train = TensorLoader(x, y, batch_size=cfg.batch_size, train=True, **kw)
        val = TensorLoader(split.test_x, split.test_y, batch_size=cfg.eval_batch_size, train=False, **kw)
        return EvalData(train, val, select, split.num_classes, split.classes, split.mean, split.std, len(split.test_y),
                        "digits (in memory)")
    if arch["in_chans"] != 3:
        raise ValueError(f"streamed data is RGB but the encoder takes {arch['in_chans']} channel(s)")
    if cfg.data and not (Path(cfg.data, "train").is_dir() and Path(cfg.data, "val").is_dir()):
        raise ValueError(f"--data={cfg.data} needs train/ and val/ sub-folders (ImageNet's layout); "
                         "give other layouts as --train_data=... --val_data=...")
    train_spec, val_spec = (cfg.data, cfg.data) if cfg.data else (cfg.train_data, cfg.val_data)
    augment = cfg.augment if cfg.augment != "auto" else ("linprobe" if cfg.tune_blocks == 0 else "finetune")
    train, val = stream_loaders(
        train_spec, val_spec, img_size=arch["img_size"], batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        augment=augment, loader=cfg.loader, num_workers=cfg.num_workers, seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, device=info.device)
    return EvalData(train, val, None, len(train.classes), list(train.classes), IMAGENET_MEAN, IMAGENET_STD,
                    val.num_samples, f"{train.source.kind} stream")


# ---- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, amp_dtype: torch.dtype, info: DistInfo) -> dict:
    """Top-1 / top-5 / loss over ``batches`` (labels ``IGNORE`` skipped), summed over the ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, n, loss sum
    for imgs, labels in batches:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            logits = model(imgs).float()
        valid = labels != IGNORE
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == labels[:, None]
        counts[0] += (hit[:, 0] & valid).sum()
        counts[1] += (hit.any(dim=-1) & valid).sum()
        counts[2] += valid.sum()
        counts[3] += nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")[valid].sum()
    if info.enabled:
        dist.all_reduce(counts)
    model.train(was_training)
    c1, c5, n, loss = counts.tolist()  # deliberate sync: once per evaluation
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}


# ---- the run ----------------------------------------------------------------------------------------------


@contextmanager
def eval_run(cfg: EvalConfig, info: DistInfo):
    """The run folder of an evaluation, as pretraining holds its own: rank 0 locks it for the run's lifetime,
    a fresh training run into a folder holding another run's checkpoints or results is refused (``--resume=auto``
    continues it), and SIGTERM is a preemption notice voted on by every rank. Yields (run_dir, write, preemption).
    """
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    write = run_dir is not None and info.is_main
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    with Preemption(info) as preemption, RunLock(run_dir) if write else nullcontext():
        if run_dir is not None and (cfg.eval_only or not cfg.resume):
            refuse_used_folder(run_dir, cfg.eval_only)
        if write:
            remove_partial_writes(run_dir)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
        yield run_dir, write, preemption


def refuse_used_folder(run_dir: Path, eval_only: bool = False) -> None:
    """A fresh run must not overwrite another run's checkpoints, metrics or results; nor may an ``eval_only``
    scoring (it writes config.json and results.json, and has nothing to resume), e.g. into the run it scores."""
    used = [p.name for p in (*list_checkpoints(run_dir), run_dir / "checkpoint-last.pt", run_dir / "results.json",
                             run_dir / "metrics.jsonl", *([run_dir / "config.json"] if eval_only else [])) if p.exists()]
    if used and eval_only:
        raise ValueError(f"{run_dir} already holds another run ({', '.join(used[:3])}); --eval_only writes its own "
                         f"config.json and results.json: pick a new --output_dir")
    if used:
        raise ValueError(f"{run_dir} already holds another run ({', '.join(used[:3])}); continue it with "
                         f"--resume=auto or pick a new --output_dir")


def run_eval(cfg: EvalConfig, split: LabelledSplit | None = None, source_sd: dict | None = None,
             source_meta: dict | None = None) -> dict:
    """Train (unless ``eval_only``) and evaluate; returns the summary (also written to ``output_dir/results.json``).

    ``split``/``source_sd`` let a caller (the demo, a sweep) pass data and weights held in memory.
    """
    return run_in_folder(cfg, lambda info, run_dir, write, preemption: _run_eval(
        cfg, info, run_dir, write, preemption, split, source_sd, source_meta))


def run_in_folder(cfg: EvalConfig, body: Callable[[DistInfo, Path | None, bool, Preemption], dict]) -> dict:
    """Validate ``cfg``, join the process group, hold the run folder (:func:`eval_run`) while ``body`` runs, and
    write ``results.json`` (rank 0) when it returns a finished summary; returns the summary with its wall time."""
    cfg.validate()
    t0 = time.perf_counter()
    info = init_distributed(cfg.device)
    try:
        with eval_run(cfg, info) as (run_dir, write, preemption):
            summary = body(info, run_dir, write, preemption)
            summary["wall_s"] = time.perf_counter() - t0
            if write and summary["status"] == "done":  # still inside: a SIGTERM now cannot tear the file
                (run_dir / "results.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "model"},
                                                                 indent=2) + "\n")
    finally:
        shutdown(info)
    return summary


def _run_eval(cfg: EvalConfig, info: DistInfo, run_dir: Path | None, write: bool, preemption: Preemption,
              split: LabelledSplit | None, source_sd: dict | None, source_meta: dict | None) -> dict:
    torch.set_flush_denormal(True)
    device = info.device
    amp_dtype = resolve_precision(cfg.precision, device, cpu_auto="fp32")
    torch.manual_seed(cfg.seed)
    sd, meta = read_source(cfg.ckpt) if source_sd is None else (source_sd, source_meta or {})
    if cfg.eval_only and sd is None:
        raise ValueError("eval_only scores a trained classifier: pass --ckpt=<run>/checkpoint-last.pt")
    recorded = meta.get("config") if cfg.eval_only and isinstance(meta.get("config"), dict) else {}
    tune_blocks = int(recorded.get("tune_blocks", cfg.tune_blocks))
    global_pool = bool(recorded.get("global_pool", cfg.global_pool))
    arch = resolve_arch(sd, meta, asdict(cfg))
    data = build_data(cfg, arch, info, split)
    vit, start = build_classifier(arch, sd, data.num_classes, tune_blocks=tune_blocks, global_pool=global_pool,
                                  drop_path=cfg.drop_path, learn_pos_embed=cfg.learn_pos_embed, mean=data.mean,
                                  std=data.std, head_sd=cfg.eval_only)
    model = Classifier(vit, start).to(device)
    if cfg.eval_only:
        ev = evaluate(model, data.val, device, amp_dtype, info)
        return {"status": "done", "protocol": "eval_only", "source": cfg.ckpt, "top1": ev["top1"], "top5": ev["top5"],
                "n_val": ev["n"], "data": data.kind, "rank": info.rank}
    if start > 0 and (cfg.mixup > 0 or cfg.cutmix > 0):
        raise ValueError("mixup/cutmix mix whole images: use them with full fine-tuning (tune_blocks=-1) only")
    trained, train_data = model, data
    if tune_blocks == 0 and isinstance(data.train, TensorLoader):
        # Frozen encoder, no augmentation: the features are computed once and the head trains on them.
        trained, train_data = vit.head, frozen_feature_data(vit, data, cfg, info, amp_dtype)
    summary = train_classifier(cfg, info, trained, train_data, amp_dtype, run_dir, write, arch, tune_blocks,
                               preemption, weights=vit)
    summary.update(source=cfg.ckpt if source_sd is None else "<in memory>", arch=arch, data=data.kind,
                   chance=1.0 / data.num_classes, rank=info.rank)
    summary["model"] = vit
    return summary


@torch.no_grad()
def encode(vit: VisionTransformer, x: Tensor, batch_size: int, amp_dtype: torch.dtype) -> Tensor:
    """The frozen encoder's pooled features of ``x`` (what the probe head sees), in float32."""
    was_training = vit.training
    vit.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out.append(vit.forward_head(vit.forward_features(x[i:i + batch_size]), pre_logits=True).float())
    vit.train(was_training)
    return torch.cat(out) if out else x.new_zeros(0, vit.embed_dim)


def frozen_feature_data(vit: VisionTransformer, data: EvalData, cfg: EvalConfig, info: DistInfo,
                        amp_dtype: torch.dtype) -> EvalData:
    """``data`` with every in-memory split replaced by its frozen features (same order, shards and seeds)."""
    def feats(loader: TensorLoader | None) -> TensorLoader | None:
        if loader is None:
            return None
        f = encode(vit, loader.x, cfg.eval_batch_size, amp_dtype)
        return TensorLoader(f, loader.y, batch_size=loader.batch_size, train=loader.train, seed=cfg.seed,
                            rank=info.rank, world_size=info.world_size, device=info.device, classes=data.classes)

    return dataclasses.replace(data, train=feats(data.train), val=feats(data.val), select=feats(data.select),
                               kind=data.kind + ", frozen features computed once")


def schedule(cfg: EvalConfig, info: DistInfo, loader_steps: int) -> tuple[int, int, int, float]:
    """(accumulated micro-batches, optimizer steps per epoch, effective batch, base lr = blr x batch / 256)."""
    accum = _accum_iter(cfg, info.world_size)
    steps_per_epoch = loader_steps // accum
    if steps_per_epoch < 1:
        raise ValueError(f"the data gives {loader_steps} batches of {cfg.batch_size} per rank per epoch, "
                         f"fewer than the {accum} accumulated for one step: lower batch_size or eff_batch_size")
    eff_batch = cfg.batch_size * info.world_size * accum
    return accum, steps_per_epoch, eff_batch, cfg.lr or cfg.blr * eff_batch / 256


def _accum_iter(cfg: EvalConfig, world_size: int) -> int:
    per_step = cfg.batch_size * world_size
    if cfg.eff_batch_size == 0:
        return 1
    if cfg.eff_batch_size % per_step:
        raise ValueError(f"eff_batch_size={cfg.eff_batch_size} is not a multiple of batch_size x ranks = {per_step}")
    return cfg.eff_batch_size // per_step


@dataclass
class Recipe:
    """What the protocol trains with: optimizer, loss, batch mixing, the step's callables."""

    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    mix: Callable | None
    no_sync: Callable | None
    params: list[Tensor]


def build_recipe(cfg: EvalConfig, info: DistInfo, model: nn.Module, vit: nn.Module, linprobe: bool,
                 num_classes: int) -> Recipe:
    """LARS for the probe, layer-decayed AdamW otherwise; cross-entropy (soft targets under mixup/cutmix)."""
    device = info.device
    if linprobe:
        optimizer = lars(model.parameters(), weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        optimizer = adamw_layer_decay(vit, cfg.weight_decay, cfg.layer_decay, (cfg.beta1, cfg.beta2), device)
    mix = None
    if not linprobe and (cfg.mixup > 0 or cfg.cutmix > 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                    num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if linprobe else cfg.smoothing)
    ddp_model = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(ddp_model) if cfg.compile else ddp_model

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        imgs, labels = batch
        return criterion(forward(imgs).float(), labels)

    return Recipe(optimizer, loss_fn, mix, ddp_model.no_sync if info.enabled else None,
                  [p for p in model.parameters() if p.requires_grad])


def labelled_batches(loader, device: torch.device, mix: Callable | None) -> Callable[[], tuple[Tensor, Tensor]]:
    """The next (images, labels) micro-batch of the current epoch, on ``device``, mixed when the recipe mixes."""
    batches = iter(loader)

    def next_batch() -> tuple[Tensor, Tensor]:
        imgs, labels = next(batches)
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return mix(imgs, labels) if mix is not None else (imgs, labels)

    return next_batch


def resume_classifier(state: TrainState, cfg: EvalConfig, run_dir: Path | None, info: DistInfo, total_steps: int,
                      accum: int, warn: Callable[[str], None]) -> tuple[int, list[dict], Path | None]:
    """Restore the newest usable checkpoint (damaged newer ones skipped with a warning) or seed a fresh run;
    returns (step, history, checkpoint path)."""
    found = find_resume_checkpoint(run_dir, cfg.resume, warn) if cfg.resume and run_dir is not None else None
    if found is None:
        # Different dropout / mixup draws on every rank, reproducible from the seed (timm's Mixup draws from numpy).
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)
        np.random.seed(cfg.seed * 1000 + info.rank + 1)
        return 0, [], None
    path, ckpt = found
    loader_spe = state.loader.steps_per_epoch
    check_position(ckpt, total_steps=total_steps, steps_per_epoch=state.steps_per_epoch, accum_iter=accum,
                   loader_steps_per_epoch=loader_spe if loader_spe % accum == 0 else None)
    history = ckpt.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"checkpoint {path}: 'history' must be a list of epoch rows")
    return state.load_state_dict(ckpt), list(history), path


def train_classifier(cfg: EvalConfig, info: DistInfo, model: nn.Module, data: EvalData, amp_dtype, run_dir: Path | None,
                     write: bool, arch: dict, tune_blocks: int, preemption: Preemption,
                     weights: nn.Module | None = None) -> dict:
    """Every protocol's training, through the engine's step, state, resume, vote and log window.

    ``model`` is what trains: a :class:`Classifier`, the probe head on frozen features, or a module with
    ``group_matcher`` (video); ``weights`` (default ``model.vit`` or ``model``) is what the checkpoints hold.
    Validation scores ``data.score(model)`` when given (multi-view testing).
    """
    device = info.device
    vit = weights if weights is not None else getattr(model, "vit", model)
    scorer = data.score(model) if data.score is not None else model
    accum, steps_per_epoch, eff_batch, base_lr = schedule(cfg, info, data.train.steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    recipe = build_recipe(cfg, info, model, vit, tune_blocks == 0, data.num_classes)
    history: list[dict] = []
    state = TrainState(vit, recipe.optimizer, data.train, None, info, steps_per_epoch=steps_per_epoch,
                       config=asdict(cfg), extra={"history": history, "arch": arch})
    warn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if info.is_main else (lambda msg: None)
    step, done, resume_path = resume_classifier(state, cfg, run_dir, info, total_steps, accum, warn)
    history.extend(done)
    if step >= total_steps and history:
        warn(f"nothing to do: the run in {run_dir} finished at step {step}; pick a new --output_dir to train again")
    log, say = open_log(cfg, run_dir, total_steps, step, write, info)
    say(f"fastmae {cfg.protocol}: {arch['embed_dim']}-wide depth-{arch['depth']} {type(vit).__name__} on {device} "
        f"({info.world_size} proc), {data.kind}, {data.num_classes} classes, {amp_dtype}, compile={cfg.compile}, "
        f"steps {step}->{total_steps} ({steps_per_epoch}/epoch), effective batch {eff_batch} (accum {accum}), "
        f"lr {base_lr:.3g}" + (f", resumed from {resume_path.name}" if resume_path else ""))

    def save() -> Path | None:
        return state.save(run_dir, step, cfg.keep_ckpts) if run_dir is not None and cfg.save_ckpt else None

    stats, window = StepStats.zeros(device), LogWindow(eff_batch, step, steps_per_epoch)
    lr_t = torch.zeros((), device=device)
    with closing(log) if log else nullcontext():
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            data.train.set_epoch(epoch)  # keeps a restored mid-epoch position
            next_batch = labelled_batches(data.train, device, recipe.mix)
            model.train()
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            while step < (epoch + 1) * steps_per_epoch:
                lr = lr_at(step, steps_per_epoch, cfg.warmup_epochs, cfg.epochs, base_lr, cfg.min_lr)
                for g in recipe.optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                loss, _ = train_step(recipe.loss_fn, recipe.optimizer, recipe.params, next_batch, accum_iter=accum,
                                     amp_dtype=amp_dtype, no_sync=recipe.no_sync, stats=stats)
                epoch_loss += loss
                epoch_steps += 1
                step += 1
                window.tick()
                if log:
                    log.advance()
                stop = preemption.stop_now()
                if step % cfg.log_every == 0:
                    row = window.close(step, stats, lr_t.fill_(lr), reduce=lambda t: all_reduce_mean(t, info))
                    if log:
                        log.log(step, row)
                    window.check_bad_run(cfg.max_bad_steps)
                at_epoch_end = step == (epoch + 1) * steps_per_epoch
                if stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0 and not at_epoch_end):
                    path = save()
                    if stop:
                        say(f"SIGTERM: saved {path.name if path else 'nothing (no run folder)'} at step {step}; exiting")
                        return {"status": "preempted", "step": step}
            row = score_epoch(model, scorer, data, amp_dtype, info, epoch, epoch_loss, epoch_steps, lr)
            history.append(row)
            if log:
                log.log(step, row)
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            save()
    if not history:
        raise ValueError(f"{run_dir} holds a finished run with no epoch history; pick a new --output_dir")
    if write and cfg.save_ckpt:
        atomic_save({"model": vit.state_dict(), "arch": arch, "classes": data.classes, "epoch": cfg.epochs - 1,
                     "top1": history[-1]["val_top1"], "pixel_mean": list(data.mean), "pixel_std": list(data.std),
                     "config": asdict(cfg)}, run_dir / "checkpoint-last.pt")
    return {"status": "done", "protocol": cfg.protocol, "step": step, **headline(history), "history": history,
            "n_val": data.n_val, "effective_batch": eff_batch}


def open_log(cfg: EvalConfig, run_dir: Path | None, total_steps: int, step: int, write: bool,
             info: DistInfo) -> tuple[RunLogger | None, Callable[[str], None]]:
    """The run's logger (None without a run folder) and the function that prints a line on rank 0."""
    log = RunLogger(run_dir, total_steps, step, write, cfg.progress and not cfg.quiet) if run_dir else None
    if log and cfg.resume:
        log.resume_at(step)  # rows the interrupted run logged after its checkpoint would appear twice
    return log, (log.info if log else print) if info.is_main and not cfg.quiet else (lambda msg: None)


def score_epoch(model: nn.Module, scorer: nn.Module, data: EvalData, amp_dtype, info: DistInfo, epoch: int,
                loss_sum: Tensor, steps: int, lr: float) -> dict:
    """The history row of an epoch: its mean training loss, validation top-1/top-5/loss (and the carved split's)."""
    # Deliberate sync, once per epoch: the epoch's mean loss for the history.
    row = {"epoch": epoch, "train_loss": loss_sum.item() / max(steps, 1), "lr": lr}
    ev = evaluate(scorer, data.val, info.device, amp_dtype, info)
    row.update(val_top1=ev["top1"], val_top5=ev["top5"], val_loss=ev["loss"], val_n=ev["n"])
    if data.select is not None:
        row["select_top1"] = evaluate(model, data.select, info.device, amp_dtype, info)["top1"]
    return row


def headline(history: list[dict]) -> dict:
    """The reported accuracy: the last epoch's, or the epoch chosen on the training-carved validation split.

    Never the best epoch on the test split (that would be selection on the test set).
    """
    last = history[-1]
    out = {"top1_last": last["val_top1"], "top5_last": last["val_top5"], "epochs_run": len(history)}
    if "select_top1" in last:
        # the first of the epochs with the best validation accuracy
        chosen = max(range(len(history)), key=lambda i: (history[i]["select_top1"], -i))
        row = history[chosen]
        out.update(top1=row["val_top1"], top5=row["val_top5"], epoch=row["epoch"],
                   reported=f"test top-1 at epoch {row['epoch']}, chosen on a validation split carved from the training "
                            f"data (its top-1 {row['select_top1']:.4f})")
    else:
        out.update(top1=last["val_top1"], top5=last["val_top5"], epoch=last["epoch"],
                   reported="test top-1 after the last epoch")
    return out


def format_result(r: dict, output_dir: str) -> str:
    """One line: the headline and what it is, the last epoch, chance."""
    if r["protocol"] == "eval_only":
        return f"top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} on {r['n_val']} validation images"
    return (f"{r['protocol']} top-1 {r['top1']:.4f} ({r['reported']}); last epoch {r['top1_last']:.4f}, "
            f"top-5 {r['top5']:.4f}; chance {r['chance']:.3f}; {r['wall_s']:.1f}s; wrote {output_dir}")
