"""Typed run configuration: named presets plus ``--key=value`` overrides.

A preset is a plain dict of field overrides on :class:`PretrainConfig`; every
registered method brings its own (:func:`pretrain_presets`). The command line
picks one with ``--preset=NAME`` and overrides any field. Every
value is parsed to the field's type and checked before any work starts, and
the resolved config is written into the run directory (``config.json``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastmae import flags
from fastmae.engine.flops import GPUS
from fastmae.flags import ALIASES, KEY_HELP, key_help, parse_flags, split_args
from fastmae.methods.registry import get_method, list_methods
from fastmae.models.mae import DECODER_INPUT_DTYPES
from fastmae.models.masks import MASK_TYPES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIDUAL_DTYPES = ("fp32", "bf16")
CUDA_GRAPHS = ("auto", "on", "off")  # auto: single-GPU runs only (DESIGN.md, hazards)
# Bounds that keep a typo from reaching a huge allocation (a 65536-px image is 51 GB of patches at batch 64).
MAX_IMG_SIZE = 4096
MAX_TOKENS = 65536
LOADERS = ("torch", "dali", "synthetic")
# The MAE paper's augmentation table: none, fixed-size crop, random-resized crop + flip (MAE), + color jitter.
PRETRAIN_AUGMENTS = ("none", "crop", "crop_flip", "crop_color")


@dataclass
class PretrainConfig:
    # run
    preset: str = "tiny"
    method: str = "mae"  # a registered method (fastmae.methods.list_methods())
    output_dir: str = ""  # "" = runs/<method>-<preset> (default_output_dir)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = the cores free now (fastmae.engine.threads)
    resume: str = ""  # "" (fresh run), "auto" (latest checkpoint in output_dir), or a checkpoint path
    allow_config_change: bool = field(default=False, metadata={"help": "resume even though a key that changes the "
                                      "learning problem (mask_ratio, model, img_size, ...) differs from the checkpoint's"})
    # data
    data: str = "demo"  # "demo" (built offline from photos shipped in installed packages), a folder, or shard pattern
    loader: str = "torch"
    num_workers: int = 2
    img_size: int = 64
    augment: str = field(default="", metadata={"help": "pretraining augmentation (MAE paper Table 1e): none | crop (fixed "
                         "size) | crop_flip (random-resized, MAE) | crop_color (+ color jitter); '' = crop_flip"})
    holdout_fraction: float = 0.05  # held out of training when the data has no val/ split
    decode: str = field(default="pil", metadata={"help": "torch loader's train crops: pil (Pillow resize) | fast (torch "
                        "uint8 bicubic-antialias resize, DCT-scaled decode where windows allow; fastmae.data.decode) | dali_roi "
                        "(DALI CPU decode of the crop window in the workers + the same torch resize; fastmae.data.dali_roi)"})
    dali_decode: str = field(default="roi", metadata={"help": "loader=dali train crops: roi (decode the crop window "
                             "only) | whole (decode the whole image, on a GPU with the hardware JPEG decoder, then crop "
                             "in the resize); bench/gpu_report.py's data section times both"})
    repeat_samples: int = field(default=1, metadata={"help": "decode each image once, train on K crops of it (each its "
                                "own mask); an epoch, the lr schedule and resume count samples (K x files)"})
    # model
    model: str = "mae_vit_tiny"
    patch_size: int = 0  # 0: the model's default
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    mask_patch_size: int = 0  # SimMIM mask cell in px, a multiple of patch_size; 0 = the model's
    num_frames: int = 16  # VideoMAE clip length
    frame_stride: int = 4  # VideoMAE frame sampling stride
    tubelet_size: int = 0  # VideoMAE tubelet depth; 0 = the model's (2)
    video_target_norm: str = ""  # "" = tubelet if norm_pix_loss else none | tubelet | channel | none
    residual_dtype: str = "fp32"  # residual stream under autocast: fp32 (official numerics) | bf16
    # MAE paper ablations (MAE; mask_type and the decoder keys also CrossMAE): 0 / "" = the model's
    mask_type: str = field(default="random", metadata={"help": "random | block (BEiT-style blocks, exact count) | grid "
                           "(keep 1 of every 2x2; mask_ratio 0.75): the MAE paper's Fig. 6"})
    loss_on: str = field(default="masked", metadata={"help": "masked (MAE) | all (loss on visible patches too: the "
                         "paper's 'w/o masked only')"})
    encoder_mask_tokens: bool = field(default=False, metadata={"help": "the encoder sees every patch, masked ones as a "
                                      "mask token (the paper's 'encoder w/ [M]', ~3.3x encoder FLOPs)"})
    decoder_embed_dim: int = field(default=0, metadata={"help": "decoder width; 0 = the model's"})
    decoder_depth: int = field(default=0, metadata={"help": "decoder blocks; 0 = the model's"})
    decoder_num_heads: int = field(default=0, metadata={"help": "decoder attention heads; 0 = the model's"})
    # CrossMAE
    prediction_ratio: float = field(default=0.0, metadata={"help": "CrossMAE: fraction of all patches decoded in "
                                    "training (a random subset of the masked); 0 = the model's (0.25)"})
    feature_fusion: str = field(default="", metadata={"help": "CrossMAE inter-block feature maps: true | false; '' = "
                                "the model's (on)"})
    # optimization (official MAE recipe: lr = blr * effective batch / 256)
    epochs: int = 30
    max_steps: int = 0  # optimizer steps; 0 = epochs * steps_per_epoch
    warmup_epochs: float = 3.0
    batch_size: int = 64  # per device
    accum_iter: int = 1
    eff_batch: int = 0  # target effective batch; > 0 on GPUs derives batch_size/accum_iter from world size and memory
    blr: float = 1.5e-4
    lr: float = 0.0  # absolute lr; 0 = derive from blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 0.0  # 0 = no clipping
    # step
    precision: str = "auto"
    compile: bool = False
    # with compile on CUDA: auto = single GPU only (not under DDP or FSDP); on = also under DDP; off = never
    cuda_graphs: str = "auto"
    fsdp: bool = False
    hsdp: bool = False  # with fsdp: shard within a node, replicate across nodes
    grad_compression: str = "none"  # DDP gradient all-reduce: none | bf16 (half the bytes)
    max_bad_steps: int = 10  # consecutive non-finite losses before aborting
    # planning (`fastmae plan`, `pretrain --dry_run`): resolve everything for a target without touching a GPU
    dry_run: bool = False
    world_size: int = 0  # 0 = from the environment (WORLD_SIZE, else 1)
    gpu: str = ""  # target GPU for a plan: h100 | a100 | h200 | l40s | b200 | ...; "" = this machine's
    network: str = "ib400"  # a plan's network between nodes: ib400 (NDR / 400 GbE per GPU) | ib200 | eth100
    gpus_per_node: int = 8  # a plan's GPUs per node (NVLink inside, the network across)
    # logging and checkpoints
    log_every: int = 10
    ckpt_every: int = 200  # optimizer steps; the final step always saves
    keep_ckpts: int = 2
    num_vis: int = 8
    progress: bool = True
    tensorboard: bool = True
    wandb: str = ""  # W&B project; "" = off
    monitor: str = field(default="", metadata={"help": "online evaluation logged beside the loss: knn (k-NN top-1 of "
                                                        "the encoder's cls feature on the embedded digits) | '' (off)"})
    monitor_every: int = field(default=0, metadata={"help": "optimizer steps between monitor scores; 0 = ckpt_every"})
    # compute levers (issue 22): each off / official by default
    decoder_input_dtype: str = field(default="auto", metadata={"help": "decoder input (K2 output) under autocast: fp32 "
                                     "(official) | autocast (bf16 table: half of K2's bytes) | auto (= residual_dtype)"})
    compile_mode: str = field(default="auto", metadata={"help": "torch.compile mode: auto (reduce-overhead when CUDA "
                              "graphs are allowed, else default) | default | reduce-overhead | max-autotune-no-cudagraphs"})
    attention_table: str = field(default="", metadata={"help": "JSON of measured attention timings per shape "
                                 "(bench/gpu_report.py --attention_table); the fastest kernel per shape wins; '' = rules"})
    fp8: str = field(default="off", metadata={"help": "FP8 training of the encoder/decoder block linears through torchao: "
                     "off | tensorwise | rowwise (needs torchao; on CUDA sm_89+)"})

    def __post_init__(self):
        # Older config.json files and flags say true/false: true meant "where allowed" (auto).
        self.cuda_graphs = {"true": "auto", "false": "off"}.get(str(self.cuda_graphs).lower(), str(self.cuda_graphs).lower())
        if not self.output_dir:
            self.output_dir = default_output_dir(self.method, self.preset)

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value (ranges, finiteness, the output folder)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        checks = [
            (self.method in list_methods(), f"method must be one of {', '.join(list_methods())}, got {self.method!r}"),
            (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.loader in LOADERS, f"loader must be one of {LOADERS}, got {self.loader!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (0 < self.img_size <= MAX_IMG_SIZE, f"img_size must be in [1, {MAX_IMG_SIZE}], got {self.img_size}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.accum_iter > 0, f"accum_iter must be positive, got {self.accum_iter}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.blr >= 0 and self.lr >= 0, f"blr and lr must be >= 0, got blr={self.blr}, lr={self.lr}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.min_lr <= (self.lr or math.inf), f"min_lr {self.min_lr} is above lr {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
            (self.ckpt_every > 0, f"ckpt_every must be positive, got {self.ckpt_every}"),
            (self.keep_ckpts > 0, f"keep_ckpts must be positive, got {self.keep_ckpts}"),
            (0.0 <= self.holdout_fraction < 1.0, f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.decode in ("pil", "fast", "dali_roi"), f"decode must be pil, fast or dali_roi, got {self.decode!r}"),
            (self.repeat_samples >= 1 and self.batch_size % self.repeat_samples == 0,
             f"repeat_samples must be >= 1 and divide batch_size {self.batch_size}, got {self.repeat_samples}"),
            (self.dali_decode in ("roi", "whole"), f"dali_decode must be roi or whole, got {self.dali_decode!r}"),
            (self.dali_decode == "roi" or self.loader == "dali", f"dali_decode={self.dali_decode} needs loader=dali"),
            (self.decode != "dali_roi" or (self.loader == "torch" and self.repeat_samples == 1),
             f"decode=dali_roi is a torch-loader decode without repeat_samples (loader {self.loader!r}, "
             f"repeat_samples {self.repeat_samples})"),
            (self.max_bad_steps > 0, f"max_bad_steps must be positive, got {self.max_bad_steps}"),
            (self.monitor in ("", "knn"), f"monitor must be knn or '' (off), got {self.monitor!r}"),
            (self.monitor_every >= 0, f"monitor_every must be >= 0, got {self.monitor_every}"),
            (0 <= self.patch_size <= self.img_size,
             f"patch_size must be in [0, img_size={self.img_size}], got {self.patch_size}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (1 <= self.num_vis <= 64, f"num_vis must be in [1, 64], got {self.num_vis}"),
            (self.mask_patch_size >= 0 and self.tubelet_size >= 0, "mask_patch_size and tubelet_size must be >= 0"),
            (self.num_frames > 0 and self.frame_stride > 0, "num_frames and frame_stride must be positive"),
            (self.residual_dtype in RESIDUAL_DTYPES,
             f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}"),
            (self.eff_batch >= 0, f"eff_batch must be >= 0, got {self.eff_batch}"),
            (self.world_size >= 0, f"world_size must be >= 0, got {self.world_size}"),
            (self.grad_compression in ("none", "bf16"), f"grad_compression must be none or bf16, got {self.grad_compression!r}"),
            (not self.hsdp or self.fsdp, "hsdp needs fsdp=true (it is FSDP's hybrid mode)"),
            (self.network in ("ib400", "ib200", "eth100"), f"network must be ib400, ib200 or eth100, got {self.network!r}"),
            (self.gpus_per_node > 0, f"gpus_per_node must be positive, got {self.gpus_per_node}"),
            (self.cuda_graphs in CUDA_GRAPHS, f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {self.cuda_graphs!r}"),
            (self.gpu == "" or self.gpu in GPUS, f"gpu must be one of {tuple(GPUS)}, got {self.gpu!r}"),
            (self.video_target_norm in ("", "tubelet", "channel", "none"),
             f"video_target_norm must be tubelet, channel or none, got {self.video_target_norm!r}"),
            (self.augment in ("",) + PRETRAIN_AUGMENTS,
             f"augment must be one of {', '.join(PRETRAIN_AUGMENTS)}, got {self.augment!r}"),
            (self.mask_type in MASK_TYPES, f"mask_type must be one of {', '.join(MASK_TYPES)}, got {self.mask_type!r}"),
            (self.mask_type != "grid" or self.mask_ratio == 0.75,
             f"mask_type=grid keeps one patch of every 2x2 cell: it needs mask_ratio=0.75, got {self.mask_ratio}"),
            (self.loss_on in ("masked", "all"), f"loss_on must be masked or all, got {self.loss_on!r}"),
            (min(self.decoder_embed_dim, self.decoder_depth, self.decoder_num_heads) >= 0,
             "decoder_embed_dim, decoder_depth and decoder_num_heads must be >= 0 (0 = the model's)"),
            (not (self.decoder_embed_dim and self.decoder_num_heads) or self.decoder_embed_dim % self.decoder_num_heads == 0,
             f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_num_heads {self.decoder_num_heads}"),
            (0.0 <= self.prediction_ratio <= 1.0,
             f"prediction_ratio must be in [0, 1] (0 = the model's), got {self.prediction_ratio}"),
            (self.feature_fusion in ("", "true", "false"), f"feature_fusion must be true or false, got {self.feature_fusion!r}"),
            *_lever_checks(self),
        ]
        for ok, reason in checks:
            if not ok:
                raise ValueError(reason)
        if self.patch_size and self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.patch_size and (self.img_size // self.patch_size) ** 2 > MAX_TOKENS:
            raise ValueError(
                f"img_size {self.img_size} / patch_size {self.patch_size} gives {(self.img_size // self.patch_size) ** 2} "
                f"patches per image, more than {MAX_TOKENS}"
            )
        _check_output_dir(self.output_dir)
        _check_attention_table(self.attention_table)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
FP8_MODES = ("off", "tensorwise", "rowwise")


def _lever_checks(cfg: PretrainConfig) -> list[tuple[bool, str]]:
    """The compute levers' keys (issue 22); the attention table's content is checked where it is read."""
    return [
        (cfg.decoder_input_dtype in DECODER_INPUT_DTYPES,
         f"decoder_input_dtype must be one of {', '.join(DECODER_INPUT_DTYPES)}, got {cfg.decoder_input_dtype!r}"),
        (cfg.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}"),
        (cfg.fp8 in FP8_MODES, f"fp8 must be one of {', '.join(FP8_MODES)}, got {cfg.fp8!r}"),
    ]


def _check_attention_table(path: str) -> None:
    """A measured attention table is read (and rejected with a one-line reason) before any work starts."""
    from fastmae.layers.attention import load_attention_table

    load_attention_table(path)


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


def describe_keys(cls=PretrainConfig, cfg=None) -> str:
    """One line per key with its value and description, for --help (:func:`fastmae.flags.describe_keys`)."""
    return flags.describe_keys(cls, cfg)


def help_text(argv: list[str], cls, presets: dict[str, dict] | None, usage: str, doc: str = "") -> str:
    """``--help`` of a command whose values resolve like :func:`parse_overrides` (pretraining's presets by default)."""
    presets = pretrain_presets() if presets is None else presets
    return flags.help_text(argv, cls, presets, usage, doc, parse=lambda a, c, p: parse_overrides(a, c, p))


__all__ = ["ALIASES", "KEY_HELP", "PretrainConfig", "default_output_dir", "describe_keys", "help_text", "key_help",
           "parse_overrides", "pretrain_presets", "split_args"]
