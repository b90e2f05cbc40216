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
import sys
import time
from collections.abc import Callable
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass
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
from fastmae.engine.distributed import DistInfo, agree, all_reduce_mean, init_distributed, shutdown
from fastmae.engine.logger import RunLogger
from fastmae.engine.optim import lr_at
from fastmae.engine.preemption import Preemption
from fastmae.engine.runlock import RunLock
from fastmae.engine.state import TrainState
from fastmae.engine.step import LogWindow, StepStats, resolve_precision, train_step
from fastmae.eval.config import EvalConfig, stored_flat
from fastmae.eval.data import (
    IGNORE,
    LabelledSplit,
    TensorLoader,
    carve_validation,
    eval_pass,
    load_digits_split,
    stream_loaders,
)
from fastmae.eval.features import FeatureLoader, frozen_store, store_identity, store_key, table_digest
from fastmae.eval.models import build_encoder, read_source, resolve_arch
from fastmae.eval.optim import adamw_layer_decay, lars
from fastmae.models.vit import VisionTransformer

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
    augment: str = ""  # streamed data: the training transform the protocol resolved ("eval" = none)
    train_pass: Callable[[], object] | None = None  # streamed data: an in-order eval-transform pass over training


def build_data(cfg: EvalConfig, arch: dict, info: DistInfo, split: LabelledSplit | None) -> EvalData:
    if cfg.data.is_demo:
        if split is None:
            split = load_digits_split(arch["img_size"], arch["in_chans"], cfg.data.test_fraction, cfg.seed)
        elif split.img_size != arch["img_size"] or split.in_chans != arch["in_chans"]:
            raise ValueError(f"data is {split.in_chans}x{split.img_size}px but the encoder takes "
                             f"{arch['in_chans']}x{arch['img_size']}px")
        x, y, select = split.train_x, split.train_y, None
        kw = dict(seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=info.device, classes=split.classes)
        if cfg.data.val_fraction > 0:
            x, y, vx, vy = carve_validation(x, y, cfg.data.val_fraction, cfg.seed)
            select = TensorLoader(vx, vy, batch_size=cfg.optim.eval_batch_size, train=False, **kw)
        if len(y) < cfg.optim.batch_size * info.world_size:
            raise ValueError(f"the training split has {len(y)} images, fewer than one batch of {cfg.optim.batch_size} "
                             f"per rank (the last partial batch is dropped): lower batch_size or add images")
        train = TensorLoader(x, y, batch_size=cfg.optim.batch_size, train=True, **kw)
        val = TensorLoader(split.test_x, split.test_y, batch_size=cfg.optim.eval_batch_size, train=False, **kw)
        return EvalData(train, val, select, split.num_classes, split.classes, split.mean, split.std, len(split.test_y),
                        "digits (in memory)")
    if arch["in_chans"] != 3:
        raise ValueError(f"streamed data is RGB but the encoder takes {arch['in_chans']} channel(s)")
    if cfg.data.path and not (Path(cfg.data.path, "train").is_dir() and Path(cfg.data.path, "val").is_dir()):
        raise ValueError(f"--data={cfg.data.path} needs train/ and val/ sub-folders (ImageNet's layout); "
                         "give other layouts as --train_data=... --val_data=...")
    train_spec, val_spec = (cfg.data.path, cfg.data.path) if cfg.data.path else (cfg.data.train_data, cfg.data.val_data)
    augment = cfg.data.augment if cfg.data.augment != "auto" else ("linprobe" if cfg.protocol.tune_blocks == 0 else "finetune")
    common = dict(img_size=arch["img_size"], loader=cfg.data.loader, num_workers=cfg.data.num_workers, seed=cfg.seed,
                  rank=info.rank, world_size=info.world_size)
    train, val = stream_loaders(train_spec, val_spec, batch_size=cfg.optim.batch_size, eval_batch_size=cfg.optim.eval_batch_size,
                                augment=augment, device=info.device, **common)
    return EvalData(train, val, None, len(train.classes), list(train.classes), IMAGENET_MEAN, IMAGENET_STD,
                    val.num_samples, f"{train.source.kind} stream", augment=augment,
                    train_pass=lambda: eval_pass(train_spec, "train", train.classes, batch_size=cfg.optim.eval_batch_size,
                                                 device=str(info.device), **common))


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
        # Rank 0 judges the folder for every rank: a rank checking after rank 0 wrote config.json would find
        # the folder used by this very run.
        problem = None
        if write and (cfg.eval_only or not cfg.resume):
            try:
                refuse_used_folder(run_dir, cfg.eval_only)
            except ValueError as e:
                problem = str(e)
        problem = agree(info, problem)
        if problem:
            raise ValueError(problem)
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
    amp_dtype = resolve_precision(cfg.step.precision, device, cpu_auto="fp32")
    torch.manual_seed(cfg.seed)
    sd, meta = read_source(cfg.model.ckpt) if source_sd is None else (source_sd, source_meta or {})
    if cfg.eval_only and sd is None:
        raise ValueError("eval_only scores a trained classifier: pass --ckpt=<run>/checkpoint-last.pt")
    recorded = stored_flat(meta.get("config"), type(cfg)) if cfg.eval_only else {}  # nested now, flat from older runs
    tune_blocks = int(recorded.get("tune_blocks", cfg.protocol.tune_blocks))
    global_pool = bool(recorded.get("global_pool", cfg.model.global_pool))
    arch = resolve_arch(sd, meta, asdict(cfg.model))
    data = build_data(cfg, arch, info, split)
    vit, start = build_classifier(arch, sd, data.num_classes, tune_blocks=tune_blocks, global_pool=global_pool,
                                  drop_path=cfg.model.drop_path, learn_pos_embed=cfg.model.learn_pos_embed, mean=data.mean,
                                  std=data.std, head_sd=cfg.eval_only)
    model = Classifier(vit, start).to(device)
    if cfg.eval_only:
        ev = evaluate(model, data.val, device, amp_dtype, info)
        return {"status": "done", "protocol": "eval_only", "source": cfg.model.ckpt, "top1": ev["top1"], "top5": ev["top5"],
                "n_val": ev["n"], "data": data.kind, "rank": info.rank}
    if start > 0 and (cfg.protocol.mixup > 0 or cfg.protocol.cutmix > 0):
        raise ValueError("mixup/cutmix mix whole images: use them with full fine-tuning (tune_blocks=-1) only")
    trained, train_data = model, data
    if tune_blocks == 0 and uses_frozen_features(cfg, data, info):
        # Frozen encoder, no augmentation: the features are computed once and the head trains on them.
        trained, train_data = vit.head, frozen_feature_data(vit, data, cfg, info, amp_dtype, run_dir,
                                                            preemption)
        if train_data is None:
            return {"status": "preempted", "step": 0}
    summary = train_classifier(cfg, info, trained, train_data, amp_dtype, run_dir, write, arch, tune_blocks,
                               preemption, weights=vit)
    summary.update(source=cfg.model.ckpt if source_sd is None else "<in memory>", arch=arch, data=train_data.kind,
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


def uses_frozen_features(cfg: EvalConfig, data: EvalData, info: DistInfo) -> bool:
    """Whether a frozen-encoder protocol trains on features computed once: in-memory data, or streamed data whose
    training transform is the eval transform (``--augment=eval``); never with ``--features=off``."""
    if cfg.data.features == "off":
        return False
    if isinstance(data.train, TensorLoader) or data.augment == "eval":
        return True
    if info.is_main and not cfg.logging.quiet:
        print(f"fastmae: note: --augment={data.augment} draws new crops every epoch, so the frozen encoder runs "
              "every step; --augment=eval computes the features once", flush=True)
    return False


def frozen_feature_data(vit: VisionTransformer, data: EvalData, cfg: EvalConfig, info: DistInfo,
                        amp_dtype: torch.dtype, run_dir: Path | None = None,
                        preemption: Preemption | None = None) -> EvalData | None:
    """``data`` with every split replaced by its frozen features (same order, shards and seeds): in memory for
    in-memory data, else from a validated on-disk store (:mod:`fastmae.eval.features`). None when preemption
    stopped the extraction."""
    def loader(x, y, batch_size: int, train: bool):
        kw = dict(batch_size=batch_size, train=train, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                  device=info.device, classes=data.classes)
        return TensorLoader(x, y, **kw) if isinstance(x, Tensor) else FeatureLoader(x, y, **kw)

    if isinstance(data.train, TensorLoader):
        def feats(split: TensorLoader | None) -> TensorLoader | None:
            return None if split is None else loader(encode(vit, split.x, cfg.optim.eval_batch_size, amp_dtype), split.y,
                                                      split.batch_size, split.train)

        return dataclasses.replace(data, train=feats(data.train), val=feats(data.val), select=feats(data.select),
                                   kind=data.kind + ", frozen features computed once")
    arrays = stored_features(vit, data, cfg, info, amp_dtype, run_dir, preemption)
    if arrays is None:
        return None
    return dataclasses.replace(data, train=loader(*arrays["train"], cfg.optim.batch_size, True),
                               val=loader(*arrays["val"], cfg.optim.eval_batch_size, False),
                               kind=data.kind + ", frozen features from a store")


def stored_features(vit: VisionTransformer, data: EvalData, cfg: EvalConfig, info: DistInfo, amp_dtype: torch.dtype,
                    run_dir: Path | None, preemption: Preemption | None) -> dict | None:
    """{"train"|"val": (features, labels)} of streamed data from the run's store (``--features=auto``) or a shared
    one (``--features=DIR``), computed first where needed."""
    if cfg.data.features == "auto" and run_dir is None:
        raise ValueError("--features=auto keeps the frozen features in the run folder: give --output_dir, or "
                         "--features=DIR / --features=off")
    identity = store_identity(vit, {"train": table_digest(data.train), "val": table_digest(data.val)},
                              img_size=data.train.img_size, mean=data.mean, std=data.std, global_pool=vit.global_pool,
                              amp_dtype=amp_dtype)
    store = run_dir / "features" if cfg.data.features == "auto" else Path(cfg.data.features) / store_key(identity)
    say = (lambda msg: print(msg, flush=True)) if info.is_main and not cfg.logging.quiet else (lambda msg: None)
    stop_now = preemption.stop_now if preemption is not None else (lambda: False)
    return frozen_store(vit, store, train=data.train, val=data.val,
                        train_pass=data.train_pass, encode=lambda x: encode(vit, x, cfg.optim.eval_batch_size, amp_dtype),
                        identity=identity, info=info, stop_now=stop_now, say=say)


def schedule(cfg: EvalConfig, info: DistInfo, loader_steps: int) -> tuple[int, int, int, float]:
    """(accumulated micro-batches, optimizer steps per epoch, effective batch, base lr = blr x batch / 256)."""
    accum = _accum_iter(cfg, info.world_size)
    steps_per_epoch = loader_steps // accum
    if steps_per_epoch < 1:
        raise ValueError(f"the data gives {loader_steps} batches of {cfg.optim.batch_size} per rank per epoch, "
                         f"fewer than the {accum} accumulated for one step: lower batch_size or eff_batch_size")
    eff_batch = cfg.optim.batch_size * info.world_size * accum
    return accum, steps_per_epoch, eff_batch, cfg.optim.lr or cfg.optim.blr * eff_batch / 256


def _accum_iter(cfg: EvalConfig, world_size: int) -> int:
    per_step = cfg.optim.batch_size * world_size
    if cfg.optim.eff_batch_size == 0:
        return 1
    if cfg.optim.eff_batch_size % per_step:
        raise ValueError(f"eff_batch_size={cfg.optim.eff_batch_size} is not a multiple of batch_size x ranks = {per_step}")
    return cfg.optim.eff_batch_size // per_step


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
        optimizer = lars(model.parameters(), weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    else:
        optimizer = adamw_layer_decay(vit, cfg.optim.weight_decay, cfg.optim.layer_decay,
                                      (cfg.optim.beta1, cfg.optim.beta2), device)
    mix = None
    if not linprobe and (cfg.protocol.mixup > 0 or cfg.protocol.cutmix > 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(mixup_alpha=cfg.protocol.mixup, cutmix_alpha=cfg.protocol.cutmix, label_smoothing=cfg.protocol.smoothing,
                    num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if linprobe else cfg.protocol.smoothing)
    ddp_model = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(ddp_model) if cfg.step.compile else ddp_model

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
    total_steps = cfg.schedule.epochs * steps_per_epoch
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
    say(f"fastmae {cfg.protocol.kind}: {arch['embed_dim']}-wide depth-{arch['depth']} {type(vit).__name__} on {device} "
        f"({info.world_size} proc), {data.kind}, {data.num_classes} classes, {amp_dtype}, compile={cfg.step.compile}, "
        f"steps {step}->{total_steps} ({steps_per_epoch}/epoch), effective batch {eff_batch} (accum {accum}), "
        f"lr {base_lr:.3g}" + (f", resumed from {resume_path.name}" if resume_path else ""))

    def save() -> Path | None:
        return state.save(run_dir, step, cfg.checkpoint.keep_ckpts) if run_dir is not None and cfg.checkpoint.save_ckpt else None

    stats, window = StepStats.zeros(device), LogWindow(eff_batch, step, steps_per_epoch)
    lr_t = torch.zeros((), device=device)
    with closing(log) if log else nullcontext():
        for epoch in range(step // steps_per_epoch, cfg.schedule.epochs):
            data.train.set_epoch(epoch)  # keeps a restored mid-epoch position
            next_batch = labelled_batches(data.train, device, recipe.mix)
            model.train()
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            while step < (epoch + 1) * steps_per_epoch:
                lr = lr_at(step, steps_per_epoch, cfg.schedule.warmup_epochs, cfg.schedule.epochs, base_lr, cfg.schedule.min_lr)
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
                if step % cfg.logging.log_every == 0:
                    row = window.close(step, stats, lr_t.fill_(lr), reduce=lambda t: all_reduce_mean(t, info))
                    if log:
                        log.log(step, row)
                    window.check_bad_run(cfg.step.max_bad_steps)
                at_epoch_end = step == (epoch + 1) * steps_per_epoch
                if stop or (cfg.checkpoint.ckpt_every and step % cfg.checkpoint.ckpt_every == 0 and not at_epoch_end):
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
    if write and cfg.checkpoint.save_ckpt:
        atomic_save({"model": vit.state_dict(), "arch": arch, "classes": data.classes, "epoch": cfg.schedule.epochs - 1,
                     "top1": history[-1]["val_top1"], "pixel_mean": list(data.mean), "pixel_std": list(data.std),
                     "config": asdict(cfg)}, run_dir / "checkpoint-last.pt")
    return {"status": "done", "protocol": cfg.protocol.kind, "step": step, **headline(history), "history": history,
            "n_val": data.n_val, "effective_batch": eff_batch}


def open_log(cfg: EvalConfig, run_dir: Path | None, total_steps: int, step: int, write: bool,
             info: DistInfo) -> tuple[RunLogger | None, Callable[[str], None]]:
    """The run's logger (None without a run folder) and the function that prints a line on rank 0."""
    log = RunLogger(run_dir, total_steps, step, write, cfg.logging.progress and not cfg.logging.quiet) if run_dir else None
    if log and cfg.resume:
        log.resume_at(step)  # rows the interrupted run logged after its checkpoint would appear twice
    return log, (log.info if log else print) if info.is_main and not cfg.logging.quiet else (lambda msg: None)


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
