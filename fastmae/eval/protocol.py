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

The loop reads like pretraining's (``fastmae/pretrain.py``): torchrun DDP
(gloo on CPU), bf16 autocast, optional ``torch.compile``, fused AdamW, no host
syncs in the step (loss statistics stay on the device until a log window ends),
atomic checkpoints with model, optimizer, data position and RNG states
(``--resume=auto`` continues exactly), SIGTERM saves then exits 0.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.engine.checkpoint import (
    atomic_save,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastmae.engine.distributed import DistInfo, init_distributed, shutdown
from fastmae.engine.logger import RunLogger
from fastmae.engine.optim import lr_at
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
    ckpt_every: int = 0  # optimizer steps; 0 = at the end of every epoch only
    keep_ckpts: int = 2
    save_ckpt: bool = True
    progress: bool = True
    quiet: bool = False

    def validate(self) -> None:
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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware computes it natively; small CPU models run faster (and exactly) in fp32.
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def run_eval(cfg: EvalConfig, split: LabelledSplit | None = None, source_sd: dict | None = None,
             source_meta: dict | None = None) -> dict:
    """Train (unless ``eval_only``) and evaluate; returns the summary (also written to ``output_dir/results.json``).

    ``split``/``source_sd`` let a caller (the demo, a sweep) pass data and weights held in memory.
    """
    cfg.validate()
    t0 = time.perf_counter()
    info = init_distributed(cfg.device)
    device = info.device
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    write = run_dir is not None and info.is_main
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            remove_partial_writes(run_dir)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    torch.set_flush_denormal(True)
    amp_dtype = resolve_precision(cfg.precision, device)
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
        summary = {"protocol": "eval_only", "source": cfg.ckpt, "top1": ev["top1"], "top5": ev["top5"],
                   "n_val": ev["n"], "data": data.kind, "wall_s": time.perf_counter() - t0, "rank": info.rank}
        if write:
            (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutdown(info)
        return summary
    if start > 0 and (cfg.mixup > 0 or cfg.cutmix > 0):
        raise ValueError("mixup/cutmix mix whole images: use them with full fine-tuning (tune_blocks=-1) only")
    summary = train_classifier(cfg, info, model, data, amp_dtype, run_dir, write, arch, tune_blocks)
    summary.update(source=cfg.ckpt if source_sd is None else "<in memory>", arch=arch, data=data.kind,
                   wall_s=time.perf_counter() - t0, chance=1.0 / data.num_classes, rank=info.rank)
    if write and summary["status"] == "done":
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutdown(info)
    summary["model"] = vit
    return summary


def _accum_iter(cfg: EvalConfig, world_size: int) -> int:
    per_step = cfg.batch_size * world_size
    if cfg.eff_batch_size == 0:
        return 1
    if cfg.eff_batch_size % per_step:
        raise ValueError(f"eff_batch_size={cfg.eff_batch_size} is not a multiple of batch_size x ranks = {per_step}")
    return cfg.eff_batch_size // per_step


def train_classifier(cfg: EvalConfig, info: DistInfo, model: nn.Module, data: EvalData, amp_dtype, run_dir: Path | None,
                     write: bool, arch: dict, tune_blocks: int) -> dict:
    """The training loop of every protocol; ``model`` is a :class:`Classifier` (its ``vit`` holds the weights) or a
    module with ``group_matcher`` (video). Validation scores ``data.score(model)`` when given (multi-view testing)."""
    device = info.device
    vit = getattr(model, "vit", model)
    scorer = data.score(model) if data.score is not None else model
    linprobe = tune_blocks == 0
    accum = _accum_iter(cfg, info.world_size)
    steps_per_epoch = data.train.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"the data gives {data.train.steps_per_epoch} batches of {cfg.batch_size} per rank per epoch, "
                         f"fewer than the {accum} accumulated for one step: lower batch_size or eff_batch_size")
    total_steps = cfg.epochs * steps_per_epoch
    eff_batch = cfg.batch_size * info.world_size * accum
    base_lr = cfg.lr or cfg.blr * eff_batch / 256
    if linprobe:
        optimizer = lars(model.parameters(), weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        optimizer = adamw_layer_decay(vit, cfg.weight_decay, cfg.layer_decay, (cfg.beta1, cfg.beta2), device)

    mixup_fn = None
    if not linprobe and (cfg.mixup > 0 or cfg.cutmix > 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=data.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if linprobe else cfg.smoothing)

    ddp_model = model
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    forward = torch.compile(ddp_model) if cfg.compile else ddp_model

    # ---- resume ----
    step, history = 0, []
    resume_path = None
    if cfg.resume and run_dir is not None:
        resume_path = latest_checkpoint(run_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        from fastmae.convert import load_into

        load_into(vit, ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = int(ckpt["step"]), list(ckpt["history"])
        data.train.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"][info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    else:
        # Different dropout / mixup draws on every rank, reproducible from the seed (timm's Mixup draws from numpy).
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)
        np.random.seed(cfg.seed * 1000 + info.rank + 1)

    log = RunLogger(run_dir, total_steps, step, write, cfg.progress and not cfg.quiet) if run_dir else None
    say = (log.info if log else print) if info.is_main and not cfg.quiet else (lambda msg: None)
    say(f"fastmae {cfg.protocol}: {arch['embed_dim']}-wide depth-{arch['depth']} {type(vit).__name__} on {device} "
        f"({info.world_size} proc), "
        f"{data.kind}, {data.num_classes} classes, {amp_dtype}, compile={cfg.compile}, steps {step}->{total_steps} "
        f"({steps_per_epoch}/epoch), effective batch {eff_batch} (accum {accum}), lr {base_lr:.3g}"
        + (f", resumed from {resume_path.name}" if resume_path else ""))

    def checkpoint() -> None:
        rngs = rng_state()
        if info.enabled:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if write and cfg.save_ckpt:
            state = {"model": vit.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "data": data.train.state_dict(), "rng": rngs, "history": history, "config": asdict(cfg),
                     "arch": arch}
            save_checkpoint(run_dir, step, state, cfg.keep_ckpts)

    stop = {"sigterm": False}

    def _on_sigterm(signum, frame):
        stop["sigterm"] = True

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if info.is_main or info.enabled else None
    zero = torch.zeros((), device=device)
    loss_sum, window_steps, window_t0 = zero.clone(), 0, time.perf_counter()
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            data.train.set_epoch(epoch)  # keeps a restored mid-epoch position
            batches = iter(data.train)
            model.train()
            epoch_loss, epoch_steps = zero.clone(), 0
            while step < (epoch + 1) * steps_per_epoch:
                lr = lr_at(step, steps_per_epoch, cfg.warmup_epochs, cfg.epochs, base_lr, cfg.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                step_loss = zero.clone()
                for micro in range(accum):
                    imgs, labels = next(batches)
                    imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if mixup_fn is not None:
                        imgs, labels = mixup_fn(imgs, labels)
                    sync = micro == accum - 1
                    ctx = ddp_model.no_sync() if info.enabled and not sync else nullcontext()
                    with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                        loss = criterion(forward(imgs).float(), labels) / accum
                    loss.backward()
                    step_loss += loss.detach()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss
                epoch_loss += step_loss
                epoch_steps += 1
                step += 1
                window_steps += 1
                if log:
                    log.advance()
                if log and (step % cfg.log_every == 0):
                    # Deliberate sync, once per log window.
                    mean_loss = (loss_sum / window_steps).item()
                    img_s = window_steps * eff_batch / (time.perf_counter() - window_t0)
                    log.log(step, {"epoch": step / steps_per_epoch, "loss": mean_loss, "lr": lr, "img_s": img_s})
                    loss_sum.zero_()
                    window_steps, window_t0 = 0, time.perf_counter()
                at_epoch_end = step == (epoch + 1) * steps_per_epoch
                if stop["sigterm"] or (cfg.ckpt_every and step % cfg.ckpt_every == 0 and not at_epoch_end):
                    checkpoint()
                    if stop["sigterm"]:
                        say(f"SIGTERM: saved step {step}; exiting")
                        return {"status": "preempted", "step": step}
            row = {"epoch": epoch, "train_loss": epoch_loss.item() / max(epoch_steps, 1), "lr": lr}
            ev = evaluate(scorer, data.val, device, amp_dtype, info)
            row.update(val_top1=ev["top1"], val_top5=ev["top5"], val_loss=ev["loss"], val_n=ev["n"])
            if data.select is not None:
                row["select_top1"] = evaluate(model, data.select, device, amp_dtype, info)["top1"]
            history.append(row)
            if log:
                log.log(step, row)
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if run_dir is not None:
                checkpoint()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if log:
            log.close()
    if write and cfg.save_ckpt:
        atomic_save({"model": vit.state_dict(), "arch": arch, "classes": data.classes, "epoch": cfg.epochs - 1,
                     "top1": history[-1]["val_top1"], "pixel_mean": list(data.mean), "pixel_std": list(data.std),
                     "config": asdict(cfg)}, run_dir / "checkpoint-last.pt")
    return {"status": "done", "protocol": cfg.protocol, "step": step, **headline(history), "history": history,
            "n_val": data.n_val, "effective_batch": eff_batch}


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
