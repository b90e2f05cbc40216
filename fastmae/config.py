"""Typed run configuration: named presets plus ``--key=value`` overrides.

A preset is a plain dict of field overrides on :class:`PretrainConfig`; every
registered method brings its own (:func:`pretrain_presets`). The command line
picks one with ``--preset=NAME`` and overrides any field. Every
value is parsed to the field's type and checked before any work starts, and
the resolved config is written into the run directory (``config.json``).
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastmae.engine.flops import GPUS
from fastmae.methods.registry import get_method, list_methods

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIDUAL_DTYPES = ("fp32", "bf16")
LOADERS = ("torch", "dali", "synthetic")


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
    # data
    data: str = "demo"  # "demo" (built offline from photos shipped in installed packages), a folder, or shard pattern
    loader: str = "torch"
    num_workers: int = 2
    img_size: int = 64
    holdout_fraction: float = 0.05  # held out of training when the data has no val/ split
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
    cuda_graphs: bool = True  # with compile on CUDA
    fsdp: bool = False
    max_bad_steps: int = 10  # consecutive non-finite losses before aborting
    # planning (`fastmae plan`, `pretrain --dry_run`): resolve everything for a target without touching a GPU
    dry_run: bool = False
    world_size: int = 0  # 0 = from the environment (WORLD_SIZE, else 1)
    gpu: str = ""  # target GPU for a plan: h100 | a100 | h200 | l40s | b200 | ...; "" = this machine's
    # logging and checkpoints
    log_every: int = 10
    ckpt_every: int = 200  # optimizer steps; the final step always saves
    keep_ckpts: int = 2
    vis_every_epochs: int = 0  # 0 = only at the end
    num_vis: int = 8
    progress: bool = True
    tensorboard: bool = True
    wandb: str = ""  # W&B project; "" = off

    def __post_init__(self):
        if not self.output_dir:
            self.output_dir = default_output_dir(self.method, self.preset)

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any bad value."""
        checks = [
            (self.method in list_methods(), f"method must be one of {', '.join(list_methods())}, got {self.method!r}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.loader in LOADERS, f"loader must be one of {LOADERS}, got {self.loader!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (self.img_size > 0, f"img_size must be positive, got {self.img_size}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.accum_iter > 0, f"accum_iter must be positive, got {self.accum_iter}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.blr > 0 or self.lr > 0, "blr or lr must be positive"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
            (self.ckpt_every > 0, f"ckpt_every must be positive, got {self.ckpt_every}"),
            (self.keep_ckpts > 0, f"keep_ckpts must be positive, got {self.keep_ckpts}"),
            (0.0 <= self.holdout_fraction < 1.0, f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.max_bad_steps > 0, f"max_bad_steps must be positive, got {self.max_bad_steps}"),
            (self.patch_size >= 0, f"patch_size must be >= 0, got {self.patch_size}"),
            (self.mask_patch_size >= 0 and self.tubelet_size >= 0, "mask_patch_size and tubelet_size must be >= 0"),
            (self.num_frames > 0 and self.frame_stride > 0, "num_frames and frame_stride must be positive"),
            (self.residual_dtype in RESIDUAL_DTYPES,
             f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}"),
            (self.eff_batch >= 0, f"eff_batch must be >= 0, got {self.eff_batch}"),
            (self.world_size >= 0, f"world_size must be >= 0, got {self.world_size}"),
            (self.gpu == "" or self.gpu in GPUS, f"gpu must be one of {tuple(GPUS)}, got {self.gpu!r}"),
            (self.video_target_norm in ("", "tubelet", "channel", "none"),
             f"video_target_norm must be tubelet, channel or none, got {self.video_target_norm!r}"),
        ]
        for ok, reason in checks:
            if not ok:
                raise ValueError(reason)
        if self.patch_size and self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def default_output_dir(method: str, preset: str) -> str:
    """``runs/<method>-<preset>`` without the method repeated: mae + base -> runs/mae-base, simmim_tiny -> runs/simmim-tiny."""
    return f"runs/{method}-{preset.removeprefix(method + '_')}"


def pretrain_presets() -> dict[str, dict]:
    """Every registered method's presets by name (MAE's ``tiny`` ... ``huge``, ``simmim_*``, ``videomae_*``, ...)."""
    out: dict[str, dict] = {}
    for method in list_methods():
        for name, preset in get_method(method).presets.items():
            if name in out:
                raise ValueError(f"preset {name!r} is defined by two methods")
            out[name] = preset
    return out


# Flag names of the official MAE scripts (main_pretrain.py and friends) that differ from ours; every other
# official name (--blr, --batch_size, --accum_iter, --output_dir, --resume, --model, --mask_ratio, --epochs,
# --warmup_epochs, --weight_decay, --lr, --min_lr, --num_workers, --seed, --device) is already ours.
ALIASES = {"data_path": "data", "input_size": "img_size", "out": "output_dir"}

# One line per key for --help, shared by every command (a key means the same thing everywhere). A field's own
# ``metadata={"help": ...}`` wins; every key of every command needs one of the two (tests/test_cli.py).
KEY_HELP = {
    # run
    "preset": "named set of defaults; the values below are this preset's",
    "method": "pretraining method (a registered one: mae, simmim, videomae, ...)",
    "config": "a run's config.json to start from (later flags override it)",
    "output_dir": "run folder (config, metrics, checkpoints, summary, pictures)",
    "seed": "random seed (data order, masks, init)",
    "device": "auto | cpu | cuda | cuda:N",
    "resume": "'' = fresh run, 'auto' = latest checkpoint in output_dir, or a checkpoint path",
    "threads": "CPU threads for torch; 0 = the cores free now (affinity minus load)",
    # data
    "data": "'demo' (photos shipped in installed packages), a class-folder tree, or tar shards 'a-{000..009}.tar'",
    "loader": "torch (PIL workers) | dali | synthetic (random images on the device, compute-only timing)",
    "num_workers": "data loading worker processes",
    "img_size": "input resolution in pixels (square)",
    "holdout_fraction": "with no val/ split: this fraction of the files is held out (seeded), never trained on",
    "test_fraction": "fraction of the labelled set used as the test split",
    "images": "'digits' (held-out split), a folder, or comma-separated image files",
    "num_images": "how many images to use",
    # model
    "model": "architecture name (fastmae.models / the method's models)",
    "patch_size": "patch size in pixels; 0 = the model's",
    "mask_ratio": "fraction of patches removed",
    "norm_pix_loss": "predict per-patch normalized pixels (the official recipe)",
    "mask_patch_size": "SimMIM mask cell in pixels (a multiple of patch_size); 0 = the model's",
    "num_frames": "VideoMAE clip length in frames",
    "frame_stride": "VideoMAE frame sampling stride",
    "tubelet_size": "VideoMAE tubelet depth in frames; 0 = the model's",
    "video_target_norm": "VideoMAE target: '' (tubelet if norm_pix_loss) | tubelet | channel | none",
    "ckpt": "checkpoint file (fastmae or official MAE), or 'random'",
    "ckpts": "comma-separated checkpoint files; 'random' = random init",
    "in_chans": "input channels; 0 = from the checkpoint",
    "embed_dim": "encoder width; 0 = from the checkpoint",
    "depth": "encoder blocks; 0 = from the checkpoint",
    "num_heads": "encoder attention heads; 0 = from the checkpoint",
    "decoder_num_heads": "decoder attention heads; 0 = from the checkpoint",
    "decoder_dim": "decoder width",
    "decoder_depth": "decoder blocks",
    "global_pool": "average the patch tokens (with fc_norm) instead of the cls token",
    "learn_pos_embed": "train the position table (initialized sin-cos)",
    "tune_blocks": "trainable encoder blocks: 0 = linear probe, k = last k, -1 = all",
    # optimization
    "epochs": "training epochs (the schedule's length)",
    "max_steps": "stop after this many optimizer steps; 0 = epochs x steps per epoch",
    "warmup_epochs": "linear learning-rate warmup, in epochs",
    "batch_size": "images per device per micro-step",
    "eval_batch_size": "images per evaluation batch",
    "accum_iter": "micro-steps per optimizer step (effective batch = batch_size x accum_iter x GPUs)",
    "blr": "base learning rate: lr = blr x effective batch / 256",
    "lr": "absolute learning rate; 0 = from blr",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (none on biases and norms)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "momentum": "LARS momentum",
    "clip_grad": "gradient norm clipping; 0 = none",
    "layer_decay": "layer-wise learning-rate decay (full fine-tuning)",
    "drop_path": "stochastic depth rate (fine-tuning)",
    "smoothing": "label smoothing",
    "mixup": "mixup alpha; 0 = off",
    "cutmix": "cutmix alpha; 0 = off",
    # step
    "precision": "auto (bf16 where native, else fp32) | fp32 | bf16 | fp16 (CUDA, with a grad scaler)",
    "compile": "torch.compile the model",
    "cuda_graphs": "CUDA graphs with compile on CUDA (reduce-overhead)",
    "fsdp": "shard parameters and optimizer state with FSDP2",
    "max_bad_steps": "consecutive non-finite steps before the run aborts",
    # logging and checkpoints
    "log_every": "optimizer steps per log line / metrics row",
    "ckpt_every": "optimizer steps between checkpoints (the last step always saves)",
    "keep_ckpts": "checkpoints kept in the run folder",
    "vis_every_epochs": "reconstruction pictures every N epochs; 0 = only at the end",
    "num_vis": "images in the reconstruction picture",
    "progress": "progress bar on a terminal (plain lines otherwise)",
    "tensorboard": "write TensorBoard events to output_dir/tb when tensorboard is installed",
    "wandb": "Weights & Biases project to log to ('' = off; WANDB_MODE=offline is respected)",
    "save_ckpt": "write the trained model",
    "quiet": "print only the result",
    "dry_run": "print what would run, run nothing",
    # evaluation and tools
    "labels": "comma-separated names for the figure (default: file names)",
    "mask": "optional .npy/.pt mask (1 = removed); overrides mask_ratio",
    "output": "file to write",
    "scale": "pixel upscaling of the picture",
    "format": "hf (transformers ViTMAE folder) | timm (timm model folder)",
    "pretrain_epochs": "demo pretraining epochs",
    "pretrain_batch": "demo pretraining batch size",
    "pretrain_blr": "demo pretraining base learning rate",
    "probe_epochs": "demo linear-probe epochs",
    "partial_epochs": "demo partial fine-tuning epochs",
    "finetune_epochs": "demo full fine-tuning epochs",
    "analyze": "also run the attention analysis",
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_value(name: str, text: str, typ: type):
    if typ is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"--{name} expects true/false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name} expects {typ.__name__}, got {text!r}") from None


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _canonical(key: str, types: dict[str, type]) -> tuple[str, bool]:
    """(field name, negated) for a flag name: dashes as underscores, official aliases, ``no_<bool key>``."""
    key = key.replace("-", "_")
    if key not in types and ALIASES.get(key) in types:
        key = ALIASES[key]
    if key not in types and key.startswith("no_") and types.get(key[3:]) is bool:
        return key[3:], True
    return key, False


def split_args(argv: list[str], cls) -> list[tuple[str, str]]:
    """``argv`` -> [(field, text value)] in order; ``--config=FILE`` expands in place to the file's values.

    Accepted: ``--key=value``, ``--key value``, ``--img-size`` for ``--img_size``, the official MAE names
    (:data:`ALIASES`), bare booleans (``--norm_pix_loss``, ``--no_norm_pix_loss``), and leading
    positional values for the fields a class lists in ``positional`` (e.g. ``fastmae data check DIR``).
    """
    types = _field_types(cls)
    positional = list(getattr(cls, "positional", ()))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not positional:
                raise ValueError(f"expected --key=value, got {arg!r}")
            pairs.append((positional.pop(0), arg))
            continue
        raw, eq, val = arg[2:].partition("=")
        key, negated = _canonical(raw, types)
        if key == "config" and "config" not in types:
            pairs += _config_file_pairs(val if eq else (argv[i] if i < len(argv) else ""), types)
            i += 0 if eq else 1
            continue
        if key not in types:
            close = [k for k in types if k.startswith(key[:3])]
            hint = f"; did you mean {', '.join('--' + k for k in close[:3])}?" if close else ""
            raise ValueError(f"unknown config key --{raw}{hint}")
        if types[key] is bool:
            if negated:
                if eq:
                    raise ValueError(f"--{raw} takes no value (it sets {key}=false)")
                val = "false"
            elif not eq:
                # A bare boolean flag; `--compile false` (a literal after it) still works.
                nxt = argv[i].lower() if i < len(argv) else ""
                val, i = (nxt, i + 1) if nxt in _TRUE + _FALSE else ("true", i)
        elif not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise ValueError(f"--{raw} needs a value (--{raw}=VALUE)")
            val = argv[i]
            i += 1
        pairs.append((key, val))
    return pairs


def _config_file_pairs(path: str, types: dict[str, type]) -> list[tuple[str, str]]:
    """The values of a run's ``config.json`` as (field, text) pairs; keys this command lacks are an error."""
    p = Path(path)
    if not path or not p.is_file():
        raise ValueError(f"--config: no such file {path!r} (give a run's config.json)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {p} must hold a JSON object")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"--config: {p} has keys this command does not take: {', '.join(unknown)}")
    return [(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in data.items()]


def parse_overrides(argv: list[str], cls=PretrainConfig, presets: dict[str, dict] | None = None):
    """``['--preset=base', '--epochs=1', ...]`` -> a validated config of type ``cls`` (presets: default
    :func:`pretrain_presets`).

    Precedence: the class defaults < the preset < ``--config=FILE`` < later flags (a flag after
    another flag of the same key wins). Unknown keys and unparsable values raise ValueError
    naming them (the CLI turns that into a one-line message). Spellings: :func:`split_args`.
    """
    types = _field_types(cls)
    pairs = split_args(argv, cls)
    given = dict(pairs)
    presets = pretrain_presets() if presets is None else presets
    default = getattr(cls(), "preset", None)
    # `--method=simmim` alone picks that method's preset rather than the default method's.
    if "preset" not in given and "method" in given and cls is PretrainConfig:
        default = get_method(given["method"]).default_preset or default
    preset = given.get("preset", default)
    base = {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
        # The config records the preset it was built from, also when --method chose it.
        base = {**presets[preset], **({"preset": preset} if "preset" in types else {})}
    values = {**base, **{k: _parse_value(k, v, types[k]) for k, v in given.items()}}
    cfg = cls(**values)  # not replace(cls(), ...): defaults that depend on other keys are derived anew
    cfg.validate()
    return cfg


def key_help(cls, name: str) -> str:
    """The one-line description of a key (field metadata first, then :data:`KEY_HELP`)."""
    f = {f.name: f for f in fields(cls)}[name]
    return f.metadata.get("help") or KEY_HELP.get(name, "")


def describe_keys(cls=PretrainConfig, cfg=None) -> str:
    """One line per key: ``--key=value`` (``cfg``'s, e.g. preset-resolved; default: the class defaults) and its help."""
    cfg = cfg if cfg is not None else cls()
    cells = [(f"  --{f.name}={_show(getattr(cfg, f.name))}", key_help(cls, f.name)) for f in fields(cls)]
    width = min(max(len(c) for c, _ in cells), 44)
    return "\n".join(f"{c.ljust(width)}  {h}" if len(c) <= width else f"{c}\n{' ' * width}  {h}" for c, h in cells)


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v) if not isinstance(v, str) or v else "''"


def help_text(argv: list[str], cls, presets: dict[str, dict] | None, usage: str, doc: str = "") -> str:
    """``--help`` of a command: usage, the docstring, presets, then every key with the value it would take.

    The other flags on the line are applied, so ``--preset=base --help`` shows the base recipe's values.
    """
    rest = [a for a in argv if a not in ("-h", "--help")]
    note = "defaults"
    try:
        cfg = parse_overrides(rest, cls=cls, presets=presets)
        if rest:
            note = "values with " + " ".join(rest)
    except ValueError as e:
        cfg, note = cls(), f"defaults (the other flags do not parse: {e})"
    names = sorted(pretrain_presets() if presets is None else presets)
    parts = [usage]
    if doc.strip():
        parts.append(doc.strip())
    parts.append("flags: --key=value or --key value; --key-name = --key_name; bare --flag / --no_flag for booleans;"
                 " --config=RUN/config.json starts from a run's config (later flags override it)")
    if ALIASES:
        parts.append("aliases (official MAE names): " + ", ".join(f"--{a} = --{t}" for a, t in ALIASES.items()))
    if names:
        parts.append(f"presets: {', '.join(names)}")
    parts.append(f"keys ({note}):\n" + describe_keys(cls, cfg))
    return "\n\n".join(parts)
