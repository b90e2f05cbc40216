"""The evaluation commands' configuration in typed sections, named as pretraining's where a key means the same.

:class:`EvalConfig` holds the run-level keys (``cfg.seed``, ``cfg.output_dir``, ...) and one section per concern:
``cfg.data``, ``cfg.model``, ``cfg.protocol``, ``cfg.optim``, ``cfg.schedule``, ``cfg.step``, ``cfg.checkpoint``,
``cfg.logging``. The section dataclasses below ARE the key -> section table: a key lives in exactly one, its
``help`` metadata is its only description, and each section's ``validate`` holds its checks (the config's own
``validate`` only those that span sections). A command (linear probe, fine-tuning, k-NN, video) subclasses
:class:`EvalConfig` with its own defaults (:func:`fastmae.flags.section`, :func:`fastmae.flags.default`) and, for
the keys only it takes, its own section subclass (``KnnProtocol``'s ``knn_k``).

Every key keeps its flat flag (``--blr``, ``--data``, ``--tune_blocks``) and takes the dotted path too
(``--optim.blr``). ``config.json`` and checkpoints' ``config`` hold ``asdict(cfg)`` (nested); earlier runs wrote
them flat, and every reader takes both (:func:`stored_flat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fastmae import flags
from fastmae.flags import default, key, raise_first, section

PRECISIONS = ("auto", "fp32", "bf16")
DEMO_DATA = ("", "digits")
AUGMENTS = ("auto", "mae", "linprobe", "finetune", "eval")

# The architecture keys a command may set over what a checkpoint records (0 = the checkpoint's); evaluation,
# analyze, visualize and export share them, and their help lives here once.
_ARCH_HELP = {
    "img_size": "input resolution in pixels (square); 0 = from the checkpoint",
    "patch_size": "patch size in pixels; 0 = the model's",
    "in_chans": "input channels; 0 = from the checkpoint",
    "embed_dim": "encoder width; 0 = from the checkpoint",
    "depth": "encoder blocks; 0 = from the checkpoint",
    "num_heads": "encoder attention heads; 0 = from the checkpoint",
    "decoder_num_heads": "decoder attention heads; 0 = from the checkpoint",
}


def arch_key(name: str):
    """The field of the ``--name`` architecture override (0 = from the checkpoint)."""
    return key(0, _ARCH_HELP[name])


@dataclass
class EvalDataConfig:
    path: str = key("", "'' (the embedded digits, in memory; finetune-video: 'demo', the embedded clips) or ROOT with "
                    "train/ and val/ (class folders or tar shards); other layouts: --train_data and --val_data",
                    flat="data")
    train_data: str = key("", "training split: class folders or tar shards 'train-{000..099}.tar' (label in .cls)")
    val_data: str = key("", "validation split (class folders or tar shards); goes with --train_data")
    loader: str = key("torch", "torch (PIL workers) | dali")
    num_workers: int = key(4, "data loading worker processes")
    augment: str = key("auto", "training augmentation: auto (the protocol's) | mae | linprobe | finetune (RandAugment) "
                       "| eval")
    test_fraction: float = key(0.25, "digits: fraction of the labelled set used as the test split")
    val_fraction: float = key(0.0, "digits: share of the training split held out to choose the reported epoch "
                              "(0 = last epoch)")
    features: str = key("auto", "frozen features of a linear probe without augmentation and of k-NN: auto (computed "
                        "once: in memory for the digits, else a validated store in OUTPUT_DIR/features) | off (the "
                        "encoder runs every step) | DIR (a store shared by runs, e.g. a learning-rate sweep)")

    @property
    def is_demo(self) -> bool:
        return self.path in DEMO_DATA and not self.train_data

    def validate(self) -> None:
        raise_first([
            (self.loader in ("torch", "dali"), f"loader must be torch or dali, got {self.loader!r}"),
            (self.augment in AUGMENTS, f"augment must be auto, mae, linprobe, finetune or eval, got {self.augment!r}"),
            (0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (not (self.path and (self.train_data or self.val_data)), "give --data=ROOT or --train_data/--val_data, not both"),
            (bool(self.train_data) == bool(self.val_data), "--train_data and --val_data go together"),
            (bool(self.features), "features must be auto, off or a folder"),
            (self.val_fraction == 0 or self.is_demo,
             "val_fraction carves the digits demo's training split; at scale the last epoch is reported"),
        ])


@dataclass
class EvalModelConfig:
    """The encoder: a checkpoint and architecture overrides (0 = from the checkpoint; random init: the digits
    demo's encoder)."""

    ckpt: str = key("random", "checkpoint file (fastmae or official MAE), or 'random'")
    img_size: int = arch_key("img_size")
    patch_size: int = arch_key("patch_size")
    in_chans: int = arch_key("in_chans")
    embed_dim: int = arch_key("embed_dim")
    depth: int = arch_key("depth")
    num_heads: int = arch_key("num_heads")
    global_pool: bool = key(False, "average the patch tokens (with fc_norm) instead of the cls token")
    learn_pos_embed: bool = key(False, "full fine-tuning only: train the position table (initialized sin-cos)")
    drop_path: float = key(0.1, "stochastic depth rate (fine-tuning)")

    def validate(self) -> None:
        raise_first([
            (min(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth, self.num_heads) >= 0,
             "architecture sizes must be >= 0 (0 = from the checkpoint)"),
            (0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}"),
        ])


@dataclass
class ProtocolConfig:
    """What trains and with which loss: the protocol's keys (a command's own keys live in its subclass)."""

    tune_blocks: int = key(-1, "trainable encoder blocks: 0 = linear probe, k = last k, -1 = all")
    smoothing: float = key(0.1, "label smoothing (fine-tuning)")
    mixup: float = key(0.0, "mixup alpha (full fine-tuning); 0 = off")
    cutmix: float = key(0.0, "cutmix alpha (full fine-tuning); 0 = off")

    @property
    def kind(self) -> str:
        """linprobe | partial | finetune: what ``tune_blocks`` makes of the encoder."""
        return "linprobe" if self.tune_blocks == 0 else ("finetune" if self.tune_blocks < 0 else "partial")

    def validate(self) -> None:
        raise_first([
            (0.0 <= self.smoothing < 1.0, f"smoothing must be in [0, 1), got {self.smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
        ])


@dataclass
class EvalOptimConfig:
    """lr = blr x effective batch / 256; LARS for the linear probe, AdamW with layer-wise decay otherwise."""

    batch_size: int = key(128, "images per device per micro-step")
    eff_batch_size: int = key(0, "effective batch reached by gradient accumulation; 0 = batch_size x ranks")
    eval_batch_size: int = key(512, "images per evaluation batch")
    blr: float = key(1e-3, "base learning rate: lr = blr x effective batch / 256")
    lr: float = key(0.0, "absolute learning rate; 0 = from blr")
    weight_decay: float = key(0.05, "weight decay (none on biases and norms)")
    layer_decay: float = key(0.75, "layer-wise learning-rate decay (full fine-tuning)")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.999, "AdamW beta2")
    momentum: float = key(0.9, "LARS momentum (linear probe)")

    def validate(self) -> None:
        raise_first([
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.eff_batch_size >= 0, f"eff_batch_size must be >= 0, got {self.eff_batch_size}"),
            (self.eval_batch_size > 0, f"eval_batch_size must be positive, got {self.eval_batch_size}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 < self.layer_decay <= 1.0, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}"),
        ])


@dataclass
class EvalScheduleConfig:
    epochs: int = key(50, "training epochs (the schedule's length)")
    warmup_epochs: float = key(5.0, "linear learning-rate warmup, in epochs")
    min_lr: float = key(1e-6, "learning rate at the end of the cosine schedule")

    def validate(self) -> None:
        raise_first([
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
        ])


@dataclass
class EvalStepConfig:
    precision: str = key("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    compile: bool = key(False, "torch.compile the model")
    max_bad_steps: int = key(10, "consecutive non-finite steps before the run aborts")

    def validate(self) -> None:
        raise_first([
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.max_bad_steps > 0, f"max_bad_steps must be positive, got {self.max_bad_steps}"),
        ])


@dataclass
class EvalCheckpointConfig:
    ckpt_every: int = key(0, "optimizer steps between checkpoints; 0 = at the end of every epoch only")
    keep_ckpts: int = key(2, "checkpoints kept in the run folder")
    save_ckpt: bool = key(True, "write the trained model")

    def validate(self) -> None:
        raise_first([
            (self.ckpt_every >= 0, f"ckpt_every must be >= 0, got {self.ckpt_every}"),
            (self.keep_ckpts > 0, f"keep_ckpts must be positive, got {self.keep_ckpts}"),
        ])


@dataclass
class EvalLoggingConfig:
    log_every: int = key(50, "optimizer steps per log line / metrics row")
    progress: bool = key(True, "progress bar on a terminal (plain lines otherwise)")
    quiet: bool = key(False, "print only the result")

    def validate(self) -> None:
        raise_first([(self.log_every > 0, f"log_every must be positive, got {self.log_every}")])


SECTIONS = ("data", "model", "protocol", "optim", "schedule", "step", "checkpoint", "logging")


@dataclass
class EvalConfig:
    preset: str = key("digits", "named set of defaults; the values below are this preset's")
    output_dir: str = key("runs/eval", "run folder (config, metrics, checkpoints, summary, pictures)")
    seed: int = key(0, "random seed (data order, init, augmentation)")
    device: str = key("auto", "auto | cpu | cuda | cuda:N")
    resume: str = key("", "'' = fresh run, 'auto' = latest checkpoint in output_dir, or a checkpoint path")
    eval_only: bool = key(False, "score a trained classifier (--ckpt) on the validation data, no training")
    data: EvalDataConfig = section(EvalDataConfig)
    model: EvalModelConfig = section(EvalModelConfig)
    protocol: ProtocolConfig = section(ProtocolConfig)
    optim: EvalOptimConfig = section(EvalOptimConfig)
    schedule: EvalScheduleConfig = section(EvalScheduleConfig)
    step: EvalStepConfig = section(EvalStepConfig)
    checkpoint: EvalCheckpointConfig = section(EvalCheckpointConfig)
    logging: EvalLoggingConfig = section(EvalLoggingConfig)

    @classmethod
    def from_flat(cls, values: dict | None = None, **kw):
        """A config from flat keys (``{"epochs": 2, "tune_blocks": 1}``, an older run's flat config), unvalidated,
        this command's defaults under them."""
        return flags.from_flat(cls, {**(values or {}), **kw})

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value: each section checks its own keys, then the
        run-level keys and the constraints that span sections."""
        for part in (self, *(getattr(self, s) for s in SECTIONS)):
            for f in fields(part):
                v = getattr(part, f.name)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{f.name} must be a finite number, got {v}")
        for s in SECTIONS:
            getattr(self, s).validate()
        flags.check_common_keys(self, {"seed", "device"})
        if self.resume and not self.output_dir:
            raise ValueError("resume needs an output_dir")
        if (self.protocol.mixup > 0 or self.protocol.cutmix > 0) and self.optim.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, "
                             f"got {self.optim.batch_size}")


def stored_flat(stored, cls=EvalConfig) -> dict:
    """A stored evaluation config (a checkpoint's ``config`` or a run's config.json: nested by section now, flat
    as earlier runs wrote it; anything else: empty) as {flat key: value}."""
    return flags.flat_dict(stored, cls) if isinstance(stored, dict) else {}


# ---- the commands' configurations: their defaults and their own keys ----------------------------------------


@dataclass
class LinprobeProtocol(ProtocolConfig):
    def validate(self) -> None:
        super().validate()
        if self.tune_blocks != 0:
            raise ValueError(f"linprobe trains the head only (tune_blocks=0); "
                             f"use `fastmae finetune --tune_blocks={self.tune_blocks}`")


@dataclass
class LinprobeConfig(EvalConfig):
    output_dir: str = default(EvalConfig, "output_dir", "runs/linprobe")
    protocol: LinprobeProtocol = section(LinprobeProtocol, tune_blocks=0)
    optim: EvalOptimConfig = section(EvalOptimConfig, batch_size=256, blr=10.0, weight_decay=0.0)
    schedule: EvalScheduleConfig = section(EvalScheduleConfig, epochs=100, warmup_epochs=10.0, min_lr=0.0)


@dataclass
class FinetuneConfig(EvalConfig):
    output_dir: str = default(EvalConfig, "output_dir", "runs/finetune")
    optim: EvalOptimConfig = section(EvalOptimConfig, blr=2e-3)
    schedule: EvalScheduleConfig = section(EvalScheduleConfig, epochs=30, warmup_epochs=3.0)


@dataclass
class KnnDataConfig(EvalDataConfig):
    augment: str = key("eval", "transform of the training images whose features vote (streamed data): eval "
                       "(resize + center crop)")


@dataclass
class KnnProtocol(ProtocolConfig):
    knn_k: int = key(20, "neighbours that vote")
    knn_temperature: float = key(0.07, "vote weight exp(cosine / T)")

    def validate(self) -> None:
        super().validate()
        raise_first([
            (self.knn_k >= 1, f"knn_k must be >= 1, got {self.knn_k}"),
            (self.knn_temperature > 0, f"knn_temperature must be > 0, got {self.knn_temperature}"),
        ])


@dataclass
class KnnConfig(EvalConfig):
    output_dir: str = default(EvalConfig, "output_dir", "runs/knn")
    data: KnnDataConfig = section(KnnDataConfig)
    protocol: KnnProtocol = section(KnnProtocol, tune_blocks=0)  # the encoder is frozen


@dataclass
class VideoModelConfig(EvalModelConfig):
    name: str = key("videomae_vit_tiny", "architecture for random init (a checkpoint's config names its own)",
                    flat="model")


@dataclass
class VideoProtocol(ProtocolConfig):
    num_frames: int = key(16, "VideoMAE clip length in frames")
    frame_stride: int = key(4, "VideoMAE frame sampling stride")
    num_clips: int = key(2, "temporal views per clip at test time (evenly spaced)")
    num_crops: int = key(3, "spatial views per clip at test time: 1 (center) or 3")

    def validate(self) -> None:
        super().validate()
        raise_first([
            (self.tune_blocks < 0, "finetune-video runs full fine-tuning (tune_blocks=-1)"),
            (self.num_crops in (1, 3) and self.num_clips >= 1,
             f"num_crops must be 1 or 3 and num_clips >= 1, got {self.num_crops}, {self.num_clips}"),
            (self.mixup == 0 and self.cutmix == 0, "mixup/cutmix are image operations; the video recipe here has none"),
        ])


@dataclass
class VideoFinetuneConfig(EvalConfig):
    preset: str = default(EvalConfig, "preset", "demo")
    output_dir: str = default(EvalConfig, "output_dir", "runs/finetune-video")
    data: EvalDataConfig = section(EvalDataConfig, path="demo", num_workers=0)
    model: VideoModelConfig = section(VideoModelConfig)
    protocol: VideoProtocol = section(VideoProtocol)
    optim: EvalOptimConfig = section(EvalOptimConfig, batch_size=4, eval_batch_size=4)
    schedule: EvalScheduleConfig = section(EvalScheduleConfig, epochs=10, warmup_epochs=1.0)


__all__ = ["SECTIONS", "EvalConfig", "FinetuneConfig", "KnnConfig", "LinprobeConfig", "VideoFinetuneConfig",
           "stored_flat"]
