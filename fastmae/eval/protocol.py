"""Supervised evaluation of an encoder: linear probe, partial and full fine-tuning (MAE protocols).

- ``tune_blocks = 0`` (linear probe): frozen encoder, cls feature (or global
  pool), ``BatchNorm1d(affine=False, eps=1e-6)`` + linear head, LARS.
  The encoder is frozen and there is no augmentation, so its features are
  computed once and the head trains on them (identical maths, far cheaper).
- ``tune_blocks = k > 0``: the last k blocks, the final norm and the head
  train (AdamW with layer-wise lr decay, drop path, label smoothing,
  mixup/cutmix); the frozen blocks' output is computed once the same way.
- ``tune_blocks < 0`` (or >= depth): full fine-tuning.

lr = blr * batch / 256, linear warmup then half-cosine per iteration. Top-1 on
the held-out split after every epoch; ``checkpoint-best.pt`` and
``checkpoint-last.pt`` hold the whole classifier plus its architecture.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastmae.engine.optim import fused_adamw_supported, lr_at
from fastmae.eval.data import LabelledSplit, check_trainable, load_split
from fastmae.eval.lars import LARS
from fastmae.eval.layer_decay import param_groups_layer_decay
from fastmae.eval.models import build_encoder, read_source, resolve_arch
from fastmae.models.vit import VisionTransformer

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalConfig:
    preset: str = "digits"
    ckpt: str = "random"  # a fastmae/official checkpoint path, or "random" (the baseline)
    data: str = "digits"  # "digits" (embedded) or a folder root/<class>/<image>
    test_fraction: float = 0.25
    output_dir: str = "runs/eval"
    seed: int = 0
    device: str = "auto"
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
    batch_size: int = 128
    eval_batch_size: int = 512
    blr: float = 1e-3
    lr: float = 0.0  # absolute lr; 0 = blr * batch_size / 256
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
    save_ckpt: bool = True
    quiet: bool = False

    def validate(self) -> None:
        checks = [
            (self.device in DEVICES or self.device.startswith("cuda:"), f"device must be one of {DEVICES}, got {self.device!r}"),
            (0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.eval_batch_size > 0, f"eval_batch_size must be positive, got {self.eval_batch_size}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 < self.layer_decay <= 1.0, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (0.0 <= self.smoothing < 1.0, f"smoothing must be in [0, 1), got {self.smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}"),
            (min(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth, self.num_heads) >= 0,
             "architecture sizes must be >= 0 (0 = from the checkpoint)"),
        ]
        for ok, reason in checks:
            if not ok:
                raise ValueError(reason)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, got {self.batch_size}")

    @property
    def protocol(self) -> str:
        return "linprobe" if self.tune_blocks == 0 else ("finetune" if self.tune_blocks < 0 else "partial")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


class _Log:
    def __init__(self, run_dir: Path | None, quiet: bool):
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.quiet = quiet
        if self.path:
            self.path.write_text("")

    def __call__(self, rec: dict) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)


@torch.no_grad()
def _tokens_through(model: VisionTransformer, x: Tensor, n_blocks: int, batch: int) -> Tensor:
    """Embedded tokens after the first ``n_blocks`` blocks, in eval mode: (N, 1 + L, D)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        t = model.embed_patches(xb, None, model.check_images(xb)[1])
        for blk in model.blocks[:n_blocks]:
            t = blk(t)
        out.append(t)
    return torch.cat(out)


def _head_from(model: VisionTransformer, t: Tensor, start: int) -> Tensor:
    """Tokens after block ``start`` -> logits: remaining blocks, final norm, pooling, head."""
    for blk in model.blocks[start:]:
        t = blk(t)
    if not model.global_pool:
        t = model.norm(t)
    return model.forward_head(t)


@torch.no_grad()
def _accuracy(model: VisionTransformer, feats: Tensor, y: Tensor, start: int, batch: int) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for i in range(0, len(y), batch):
        correct += (_head_from(model, feats[i : i + batch], start).argmax(-1) == y[i : i + batch]).sum()
    return correct.item() / len(y)  # one sync per evaluation


def _freeze_for(model: VisionTransformer, tune_blocks: int, learn_pos_embed: bool = False) -> int:
    """Set requires_grad for the protocol; returns the first trainable block (depth for the linear probe).

    Linear probe: the head only. Partial: the last k blocks, the final norm (or fc_norm) and the head.
    """
    depth = len(model.blocks)
    start = 0 if tune_blocks < 0 or tune_blocks >= depth else depth - tune_blocks
    for name, p in model.named_parameters():
        if name == "pos_embed":
            trainable = learn_pos_embed and start == 0 and tune_blocks != 0
        elif tune_blocks == 0:
            trainable = name.startswith("head.")
        else:
            trainable = start == 0 or name.startswith(("head.", "norm.", "fc_norm.")) or (
                name.startswith("blocks.") and int(name.split(".")[1]) >= start)
        p.requires_grad_(trainable)
    return start


def run_eval(cfg: EvalConfig, split: LabelledSplit | None = None, source_sd: dict | None = None,
             source_meta: dict | None = None) -> dict:
    """Train and evaluate; returns the summary (also written to ``output_dir/results.json``).

    ``split``/``source_sd`` let a caller (the demo) pass data and weights held in memory.
    """
    cfg.validate()
    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)

    if source_sd is None:
        sd, meta = read_source(cfg.ckpt)
    else:
        sd, meta = source_sd, source_meta or {}
    arch = resolve_arch(sd, meta, asdict(cfg))
    if split is None:
        split = load_split(cfg.data, arch["img_size"], arch["in_chans"], cfg.test_fraction, cfg.seed)
    elif split.img_size != arch["img_size"] or split.in_chans != arch["in_chans"]:
        raise ValueError(f"data is {split.in_chans}x{split.img_size}px but the encoder takes "
                         f"{arch['in_chans']}x{arch['img_size']}px")
    check_trainable(split, cfg.batch_size)

    linprobe = cfg.tune_blocks == 0
    model = build_encoder(arch, sd, num_classes=split.num_classes, global_pool=cfg.global_pool,
                          drop_path_rate=0.0 if linprobe else cfg.drop_path, learn_pos_embed=cfg.learn_pos_embed,
                          pixel_mean=split.mean, pixel_std=split.std)
    with torch.no_grad():
        if linprobe:
            # MAE's probe head: BN without affine whitens the features, then a linear layer.
            nn.init.trunc_normal_(model.head.weight, std=0.01)
            nn.init.zeros_(model.head.bias)
            model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
        else:
            nn.init.trunc_normal_(model.head.weight, std=2e-5)
            nn.init.zeros_(model.head.bias)
    model.to(device)
    start = _freeze_for(model, cfg.tune_blocks, cfg.learn_pos_embed)
    if start > 0 and (cfg.mixup > 0 or cfg.cutmix > 0):
        raise ValueError("mixup/cutmix mix whole images: use them with full fine-tuning (tune_blocks=-1) only")

    train_x, train_y = split.train_x.to(device), split.train_y.to(device)
    test_x, test_y = split.test_x.to(device), split.test_y.to(device)
    eb = cfg.eval_batch_size
    # Frozen prefix computed once: tokens after block `start` (all blocks for the probe).
    train_t = _tokens_through(model, train_x, start, eb)
    test_t = _tokens_through(model, test_x, start, eb)

    n_train = len(train_y)
    steps_per_epoch = n_train // cfg.batch_size
    base_lr = cfg.lr or cfg.blr * cfg.batch_size / 256
    if linprobe:
        optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.0,
                         weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        for g in optimizer.param_groups:
            g["lr_scale"] = 1.0
    else:
        groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                      fused=fused_adamw_supported(device))

    mixup_fn, criterion = None, None
    if not linprobe and (cfg.mixup > 0 or cfg.cutmix > 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=split.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        smoothing = 0.0 if linprobe else cfg.smoothing
        criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)

    log = _Log(run_dir, cfg.quiet)
    best = {"acc": -1.0, "epoch": -1}
    acc = 0.0
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            lr = lr_at(step, steps_per_epoch, cfg.warmup_epochs, cfg.epochs, base_lr, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb, yb = train_t[idx], train_y[idx]
            if mixup_fn is not None:
                xb, yb = mixup_fn(train_x[idx], yb)
                xb = model.embed_patches(xb, None, model.check_images(xb)[1])
            elif start == 0 and not linprobe:
                xb = model.embed_patches(train_x[idx], None, model.check_images(train_x[idx])[1])
            loss = criterion(_head_from(model, xb, start), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
        if start == 0:
            test_t = _tokens_through(model, test_x, 0, eb)  # the embeddings train too
        acc = _accuracy(model, test_t, test_y, start, eb)
        rec = {"epoch": epoch, "train_loss": loss_sum.item() / max(steps_per_epoch, 1), "test_acc": acc, "lr": lr}
        log(rec)
        if acc > best["acc"]:
            best = {"acc": acc, "epoch": epoch}
            if run_dir and cfg.save_ckpt:
                _save(run_dir / "checkpoint-best.pt", model, arch, split, cfg, epoch, acc)
    if run_dir and cfg.save_ckpt:
        _save(run_dir / "checkpoint-last.pt", model, arch, split, cfg, cfg.epochs - 1, acc)
    summary = {"protocol": cfg.protocol, "source": cfg.ckpt if source_sd is None else "<in memory>",
               "best_acc": best["acc"], "best_epoch": best["epoch"], "last_acc": acc,
               "chance": 1.0 / split.num_classes, "n_train": n_train, "n_test": len(test_y),
               "arch": arch, "wall_s": time.perf_counter() - t0}
    if run_dir:
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["model"] = model
    return summary


def _save(path: Path, model: nn.Module, arch: dict, split: LabelledSplit, cfg: EvalConfig, epoch: int, acc: float) -> None:
    torch.save({"model": model.state_dict(), "arch": arch, "classes": split.classes, "epoch": epoch, "acc": acc,
                "pixel_mean": list(split.mean), "pixel_std": list(split.std), "config": asdict(cfg)}, path)
