"""Typed run configuration in sections: named presets plus ``--key=value`` overrides.

:class:`PretrainConfig` holds the run-level keys and one typed section per concern (``cfg.data``,
``cfg.model``, ``cfg.method``, ``cfg.optim``, ``cfg.schedule``, ``cfg.step``, ``cfg.checkpoint``,
``cfg.logging``, ``cfg.plan``). The section dataclasses below ARE the key -> section table: a key lives in
exactly one, its ``help`` metadata is its only description, and each section's ``validate`` holds its checks.
``cfg.method`` is the method's own dataclass (``MethodSpec.config``: MAE's mask and decoder keys, SimMIM's mask
cell, VideoMAE's clip keys, ...), chosen by ``--method``.

Every key keeps its flat flag (``--blr``, ``--data``, ``--mask_type``); the dotted path works too
(``--optim.blr``). A preset is a flat dict of such keys; every registered method brings its own
(:func:`pretrain_presets`). Values are parsed to the field's type and checked before any work starts, and
the resolved config is written into the run directory (``config.json``, nested by section); older flat
config.json files and the flat config inside checkpoints still read (:func:`fastmae.flags.flat_dict`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastmae import flags
from fastmae.engine.flops import GPUS
from fastmae.flags import ALIASES, key, key_help, parse_flags, split_args
from fastmae.flags import raise_first as _raise_first
from fastmae.layers import patch_embed
from fastmae.methods.registry import MethodConfig, get_method, list_methods
from fastmae.models.decoder import DECODER_INPUT_DTYPES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIDUAL_DTYPES = ("fp32", "bf16")
CUDA_GRAPHS = ("auto", "on", "off")  # auto: single-GPU runs only (DESIGN.md, hazards)
# Bounds that keep a typo from reaching a huge allocation (a 65536-px image is 51 GB of patches at batch 64).
MAX_IMG_SIZE = 4096
MAX_TOKENS = 65536
LOADERS = ("torch", "dali", "synthetic")
# The MAE paper's augmentation table: none, fixed-size crop, random-resized crop + flip (MAE), + color jitter.
PRETRAIN_AUGMENTS = ("none", "crop", "crop_flip", "crop_color")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
FP8_MODES = ("off", "tensorwise", "rowwise")


def _finite(section) -> None:
    for f in fields(section):
        v = getattr(section, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name} must be a finite number, got {v}")


@dataclass
class DataConfig:
    path: str = key("demo", "'demo' (photos shipped in installed packages), a class-folder tree, or tar shards "
                    "'a-{000..009}.tar'", flat="data")
    loader: str = key("torch", "torch (PIL workers) | dali | synthetic (random images on the device, compute-only timing)")
    num_workers: int = key(2, "data loading worker processes")
    img_size: int = key(64, "input resolution in pixels (square)")
    augment: str = key("", "pretraining augmentation (MAE paper Table 1e): none | crop (fixed size) | crop_flip "
                       "(random-resized, MAE) | crop_color (+ color jitter); '' = crop_flip")
    holdout_fraction: float = key(0.05, "with no val/ split: this fraction of the files is held out (seeded), never "
                                  "trained on")
    decode: str = key("pil", "torch loader's train crops: pil (Pillow resize) | fast (torch uint8 bicubic-antialias "
                      "resize, DCT-scaled decode where windows allow; fastmae.data.decode) | dali_roi (DALI CPU decode "
                      "of the crop window in the workers + the same torch resize; fastmae.data.dali_roi)")
    dali_decode: str = key("roi", "loader=dali train crops: roi (decode the crop window only) | whole (decode the whole "
                           "image, on a GPU with the hardware JPEG decoder, then crop in the resize); "
                           "bench/gpu_report.py's data section times both")
    repeat_samples: int = key(1, "decode each image once, train on K crops of it (each its own mask); an epoch, the lr "
                              "schedule and resume count samples (K x files)")

    def validate(self) -> None:
        _raise_first([
            (self.loader in LOADERS, f"loader must be one of {LOADERS}, got {self.loader!r}"),
            (0 < self.img_size <= MAX_IMG_SIZE, f"img_size must be in [1, {MAX_IMG_SIZE}], got {self.img_size}"),
            (0.0 <= self.holdout_fraction < 1.0, f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.decode in ("pil", "fast", "dali_roi"), f"decode must be pil, fast or dali_roi, got {self.decode!r}"),
            (self.dali_decode in ("roi", "whole"), f"dali_decode must be roi or whole, got {self.dali_decode!r}"),
            (self.dali_decode == "roi" or self.loader == "dali", f"dali_decode={self.dali_decode} needs loader=dali"),
            (self.decode != "dali_roi" or (self.loader == "torch" and self.repeat_samples == 1),
             f"decode=dali_roi is a torch-loader decode without repeat_samples (loader {self.loader!r}, "
             f"repeat_samples {self.repeat_samples})"),
            (self.augment in ("",) + PRETRAIN_AUGMENTS,
             f"augment must be one of {', '.join(PRETRAIN_AUGMENTS)}, got {self.augment!r}"),
        ])


@dataclass
class ModelConfig:
    name: str = key("mae_vit_tiny", "architecture name (fastmae.models / the method's models)", flat="model")
    patch_size: int = key(0, "patch size in pixels; 0 = the model's")
    mask_ratio: float = key(0.75, "fraction of patches removed")
    norm_pix_loss: bool = key(True, "predict per-patch normalized pixels (the official recipe)")

    def validate(self) -> None:
        _raise_first([
            (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (self.patch_size >= 0, f"patch_size must be >= 0, got {self.patch_size}"),
        ])


@dataclass
class OptimConfig:
    """Official MAE recipe: lr = blr * effective batch / 256."""

    batch_size: int = key(64, "images per device per micro-step")
    accum_iter: int = key(1, "micro-steps per optimizer step (effective batch = batch_size x accum_iter x GPUs)")
    eff_batch: int = key(0, "target effective batch; > 0 on GPUs derives batch_size/accum_iter from world size and memory")
    blr: float = key(1.5e-4, "base learning rate: lr = blr x effective batch / 256")
    lr: float = key(0.0, "absolute learning rate; 0 = from blr")
    weight_decay: float = key(0.05, "AdamW weight decay (none on biases and norms)")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    clip_grad: float = key(0.0, "gradient norm clipping; 0 = none")

    def validate(self) -> None:
        _raise_first([
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.accum_iter > 0, f"accum_iter must be positive, got {self.accum_iter}"),
            (self.eff_batch >= 0, f"eff_batch must be >= 0, got {self.eff_batch}"),
            (self.blr >= 0 and self.lr >= 0, f"blr and lr must be >= 0, got blr={self.blr}, lr={self.lr}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
        ])


@dataclass
class ScheduleConfig:
    epochs: int = key(30, "training epochs (the schedule's length)")
    max_steps: int = key(0, "stop after this many optimizer steps; 0 = epochs x steps per epoch")
    warmup_epochs: float = key(3.0, "linear learning-rate warmup, in epochs")
    min_lr: float = key(0.0, "learning rate at the end of the cosine schedule")

    def validate(self) -> None:
        _raise_first([
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
        ])


@dataclass
class StepConfig:
    """How a step runs: precision, compilation, sharding, and the compute levers (issue 22, each off / official
    by default)."""

    precision: str = key("auto", "auto (bf16 where native, else fp32) | fp32 | bf16 | fp16 (CUDA, with a grad scaler)")
    compile: bool = key(False, "torch.compile the model")
    cuda_graphs: str = key("auto", "CUDA graphs with compile on CUDA: auto (one GPU only, not under DDP or FSDP), on "
                           "(also under DDP), off")
    compile_mode: str = key("auto", "torch.compile mode: auto (reduce-overhead when CUDA graphs are allowed, else "
                            "default) | default | reduce-overhead | max-autotune-no-cudagraphs")
    fsdp: bool = key(False, "shard parameters and optimizer state with FSDP2")
    hsdp: bool = key(False, "with fsdp: shard within a node, replicate across nodes (HSDP)")
    grad_compression: str = key("none", "DDP gradient all-reduce: none | bf16 (half the bytes, gradients rounded to bf16)")
    max_bad_steps: int = key(10, "consecutive non-finite steps before the run aborts")
    residual_dtype: str = key("auto", "residual stream under autocast: fp32 (official numerics) | bf16 (half the "
                              "stream's bytes) | auto (bf16 on CUDA, fp32 elsewhere: default_residual_dtype)")
    decoder_input_dtype: str = key("auto", "decoder input (K2 output) under autocast: fp32 (official) | autocast (bf16 "
                                   "table: half of K2's bytes) | auto (= residual_dtype)")
    attention_table: str = key("", "JSON of measured attention timings per shape (bench/gpu_report.py "
                               "--attention_table); the fastest kernel per shape wins; '' = rules")
    fp8: str = key("off", "FP8 training of the encoder/decoder block linears through torchao: off | tensorwise | "
                   "rowwise (needs torchao; on CUDA sm_89+)")

    def __post_init__(self):
        # Older config.json files and flags say true/false: true meant "where allowed" (auto).
        self.cuda_graphs = {"true": "auto", "false": "off"}.get(str(self.cuda_graphs).lower(), str(self.cuda_graphs).lower())

    def validate(self) -> None:
        _raise_first([
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.cuda_graphs in CUDA_GRAPHS, f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {self.cuda_graphs!r}"),
            (self.compile_mode in COMPILE_MODES,
             f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"),
            (not self.hsdp or self.fsdp, "hsdp needs fsdp=true (it is FSDP's hybrid mode)"),
            (self.grad_compression in ("none", "bf16"), f"grad_compression must be none or bf16, got {self.grad_compression!r}"),
            (self.max_bad_steps > 0, f"max_bad_steps must be positive, got {self.max_bad_steps}"),
            (self.residual_dtype in RESIDUAL_DTYPES,
             f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}"),
            (self.decoder_input_dtype in DECODER_INPUT_DTYPES,
             f"decoder_input_dtype must be one of {', '.join(DECODER_INPUT_DTYPES)}, got {self.decoder_input_dtype!r}"),
            (self.fp8 in FP8_MODES, f"fp8 must be one of {', '.join(FP8_MODES)}, got {self.fp8!r}"),
        ])
        _check_attention_table(self.attention_table)


@dataclass
class CheckpointConfig:
    ckpt_every: int = key(200, "optimizer steps between checkpoints (the last step always saves)")
    keep_ckpts: int = key(2, "checkpoints kept in the run folder")
    ckpt_format: str = key("file", "file (one weights-only .pt written by rank 0) | dcp (a torch.distributed.checkpoint "
                           "folder: FSDP ranks write their own shards, otherwise rank 0 writes in the background) | auto "
                           "(dcp on several processes, file on one)")

    def validate(self) -> None:
        _raise_first([
            (self.ckpt_every > 0, f"ckpt_every must be positive, got {self.ckpt_every}"),
            (self.keep_ckpts > 0, f"keep_ckpts must be positive, got {self.keep_ckpts}"),
            (self.ckpt_format in ("file", "dcp", "auto"), f"ckpt_format must be file, dcp or auto, got {self.ckpt_format!r}"),
        ])


@dataclass
class LoggingConfig:
    log_every: int = key(10, "optimizer steps per log line / metrics row")
    num_vis: int = key(8, "images in the reconstruction picture")
    progress: bool = key(True, "progress bar on a terminal (plain lines otherwise)")
    tensorboard: bool = key(True, "write TensorBoard events to output_dir/tb when tensorboard is installed")
    wandb: str = key("", "Weights & Biases project to log to ('' = off; WANDB_MODE=offline is respected)")
    monitor: str = key("", "online evaluation logged beside the loss: knn (k-NN top-1 of the encoder's cls feature on "
                       "the embedded digits) | '' (off)")
    monitor_every: int = key(0, "optimizer steps between monitor scores; 0 = ckpt_every")

    def validate(self) -> None:
        _raise_first([
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
            (1 <= self.num_vis <= 64, f"num_vis must be in [1, 64], got {self.num_vis}"),
            (self.monitor in ("", "knn"), f"monitor must be knn or '' (off), got {self.monitor!r}"),
            (self.monitor_every >= 0, f"monitor_every must be >= 0, got {self.monitor_every}"),
        ])


@dataclass
class PlanConfig:
    """`fastmae plan` / `pretrain --dry_run`: resolve everything for a target without touching a GPU."""

    world_size: int = key(0, "processes for a plan (--dry_run); 0 = from the environment (WORLD_SIZE, else 1)")
    gpu: str = key("", "target GPU for a plan: h100 | a100 | h200 | l40s | b200 | ...; '' = this machine's")
    network: str = key("ib400", "a plan's network between nodes: ib400 (NDR / 400 GbE per GPU) | ib200 | eth100")
    gpus_per_node: int = key(8, "a plan's GPUs per node (NVLink inside a node, the network across)")

    def validate(self) -> None:
        _raise_first([
            (self.world_size >= 0, f"world_size must be >= 0, got {self.world_size}"),
            (self.network in ("ib400", "ib200", "eth100"), f"network must be ib400, ib200 or eth100, got {self.network!r}"),
            (self.gpus_per_node > 0, f"gpus_per_node must be positive, got {self.gpus_per_node}"),
            (self.gpu == "" or self.gpu in GPUS, f"gpu must be one of {tuple(GPUS)}, got {self.gpu!r}"),
        ])


def method_configs() -> dict[str, type[MethodConfig]]:
    """{method name: the dataclass of its keys} for every registered method (what ``cfg.method`` can be)."""
    return {name: get_method(name).config for name in list_methods()}


def _default_method() -> MethodConfig:
    return get_method("mae").config(name="mae")


SECTIONS = ("data", "model", "method", "optim", "schedule", "step", "checkpoint", "logging", "plan")


@dataclass
class PretrainConfig:
    preset: str = key("tiny", "named set of defaults; the values below are this preset's")
    output_dir: str = key("", "run folder (config, metrics, checkpoints, summary, pictures); '' = runs/<method>-<preset>")
    seed: int = key(0, "random seed (data order, masks, init)")
    device: str = key("auto", "auto | cpu | cuda | cuda:N")
    threads: int = key(0, "CPU threads for torch; 0 = the cores free now (affinity minus load)")
    resume: str = key("", "'' = fresh run, 'auto' = latest checkpoint in output_dir, or a checkpoint path")
    allow_config_change: bool = key(False, "resume even though a key that changes the learning problem (mask_ratio, "
                                    "model, img_size, ...) differs from the checkpoint's")
    dry_run: bool = key(False, "print the plan for the target (GPUs, memory, time), run nothing")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=_default_method, metadata={"variants": method_configs})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    step: StepConfig = field(default_factory=StepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self):
        if not self.output_dir:
            self.output_dir = default_output_dir(self.method.name, self.preset)
        if self.step.residual_dtype == "auto":  # resolved here, so config.json and every consumer see the dtype
            self.step.residual_dtype = default_residual_dtype(self.device)

    @classmethod
    def from_flat(cls, values: dict | None = None, **kw) -> PretrainConfig:
        """A config from flat keys (``{"blr": 1e-3, "data": "demo"}``, a preset, an older run's flat config),
        unvalidated; keys of another method than the one named are dropped (older configs hold them all)."""
        return flags.from_flat(cls, {**(values or {}), **kw})

    def flat(self) -> dict:
        """{flat key: value}: the layout of checkpoints' stored config (older checkpoints share it)."""
        return flags.flat_values(self)

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value: each section checks its own keys, then the
        constraints that span sections, then the output folder."""
        for section in (self, *(getattr(self, s) for s in SECTIONS)):
            _finite(section)
        flags.check_common_keys(self, {"threads", "seed", "device"})
        for s in SECTIONS:
            getattr(self, s).validate(self) if s == "method" else getattr(self, s).validate()
        self._check_across_sections()
        _check_output_dir(self.output_dir)

    def _check_across_sections(self) -> None:
        d, m, o, s = self.data, self.model, self.optim, self.schedule
        _raise_first([
            (s.min_lr <= (o.lr or math.inf), f"min_lr {s.min_lr} is above lr {o.lr}"),
            (d.repeat_samples >= 1 and o.batch_size % d.repeat_samples == 0,
             f"repeat_samples must be >= 1 and divide batch_size {o.batch_size}, got {d.repeat_samples}"),
            (m.patch_size <= d.img_size, f"patch_size must be in [0, img_size={d.img_size}], got {m.patch_size}"),
        ])
        if m.patch_size:
            check_patch_grid(d.img_size, m.patch_size)

    def to_dict(self) -> dict:
        """Nested by section: what ``config.json`` holds."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def check_patch_grid(img_size: int, patch_size: int) -> None:
    """The image must tile into patches (the patch embedding's own check), and not into more than
    :data:`MAX_TOKENS` of them."""
    patch_embed.check_patch_grid(img_size, patch_size)
    if (img_size // patch_size) ** 2 > MAX_TOKENS:
        raise ValueError(f"img_size {img_size} / patch_size {patch_size} gives {(img_size // patch_size) ** 2} "
                         f"patches per image, more than {MAX_TOKENS}")


def _check_attention_table(path: str) -> None:
    """A measured attention table is read (and rejected with a one-line reason) before any work starts."""
    from fastmae.layers.attention import load_attention_table

    load_attention_table(path)


def default_residual_dtype(device: str) -> str:
    """``residual_dtype=auto``: bf16 on CUDA, fp32 elsewhere.

    A/B to convergence on the demo set (``bench/RESULTS.md``, "Compute levers": tiny 1,000 steps and small 200 steps,
    3 seeds each) found the fp32 and bf16 streams' losses equal within 1e-4, against seed spreads of 0.004-0.02; on
    a GPU the bf16 stream halves the residual's HBM traffic (the plan's +3% on ViT-B/H100). On a CPU the same
    lever made ViT-B's eager bf16 step 3.5% slower (``bench/bench_step.py``), so CPU runs keep the official fp32.
    """
    if device.startswith("cuda"):
        return "bf16"
    if device == "auto":
        import torch

        return "bf16" if torch.cuda.is_available() else "fp32"
    return "fp32"


def default_output_dir(method: str, preset: str) -> str:
    """``runs/<method>-<preset>`` without the method repeated: mae + base -> runs/mae-base, simmim_tiny -> runs/simmim-tiny."""
    return f"runs/{method}-{preset.removeprefix(method + '_')}"


def _check_output_dir(path: str) -> None:
    """The run folder must be creatable: it may exist as a folder, or not yet, under writable folders only."""
    flags.check_output_path("output_dir", path)


def pretrain_presets() -> dict[str, dict]:
    """Every registered method's presets by name (MAE's ``tiny`` ... ``huge``, ``simmim_*``, ``videomae_*``, ...)."""
    out: dict[str, dict] = {}
    for method in list_methods():
        for name, preset in get_method(method).presets.items():
            if name in out:
                raise ValueError(f"preset {name!r} is defined by two methods")
            out[name] = preset
    return out


def parse_overrides(argv: list[str], cls=PretrainConfig, presets: dict[str, dict] | None = None):
    """``['--preset=base', '--epochs=1', ...]`` -> a validated config of type ``cls`` (:func:`fastmae.flags.parse_flags`;
    presets default to :func:`pretrain_presets`). ``--method=simmim`` alone picks that method's default preset."""
    presets = pretrain_presets() if presets is None else presets
    default = None
    if cls is PretrainConfig:
        given = dict(split_args(argv, cls))
        if "preset" not in given and "method" in given:
            default = get_method(given["method"]).default_preset or None
    return parse_flags(argv, cls, presets, default_preset=default)


def flat_config(stored: dict | None) -> dict:
    """A stored run config (a checkpoint's ``config``, a config.json: nested now, flat from older runs) as
    {flat key: value}, the one layout the resume checks, export and evaluation read."""
    return flags.flat_dict(stored or {}, PretrainConfig)


def describe_keys(cls=PretrainConfig, cfg=None) -> str:
    """One line per key with its value and description, grouped by section, for --help (:func:`fastmae.flags.describe_keys`)."""
    return flags.describe_keys(cls, cfg)


def help_text(argv: list[str], cls, presets: dict[str, dict] | None, usage: str, doc: str = "") -> str:
    """``--help`` of a command whose values resolve like :func:`parse_overrides` (pretraining's presets by default)."""
    presets = pretrain_presets() if presets is None else presets
    return flags.help_text(argv, cls, presets, usage, doc, parse=lambda a, c, p: parse_overrides(a, c, p))


__all__ = ["ALIASES", "SECTIONS", "PretrainConfig", "default_output_dir", "describe_keys", "flat_config",
           "help_text", "key", "key_help", "method_configs", "parse_overrides", "pretrain_presets", "split_args"]
