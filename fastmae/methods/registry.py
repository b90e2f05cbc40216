"""The method registry: every pretraining method is one :class:`MethodSpec`, looked up by name.

The training loop, the config and the evaluation commands ask the registry and never branch on a
method's name: a spec says how to build the method's models and loaders, the shape of the mask
noise its forward takes, its FLOPs, its held-out evaluation and its reconstruction pictures.
Every model a spec builds has ``forward(batch, mask_ratio=..., noise=None) -> (loss, pred, mask)``.

Built-in methods live one per module in :data:`BUILTIN_METHODS` and are imported on first use,
so importing the registry (or ``fastmae.config``) builds nothing.

Adding a method:
1. write ``fastmae/methods/<name>.py``: the model (or import it from ``fastmae.models``), its
   factories, and one ``register_method(MethodSpec(name="<name>", ...))`` line at the end;
   nothing else may run at import time;
2. add ``"fastmae.methods.<name>"`` to :data:`BUILTIN_METHODS`;
3. add its tests (parity of the loss against the paper's formula, a short run through
   ``fastmae pretrain --method=<name>``).
No other file changes: ``--method=<name>`` and its presets work in ``fastmae pretrain``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BUILTIN_METHODS",
    "MethodConfig",
    "MethodSpec",
    "build_meta_model",
    "find_model",
    "get_method",
    "image_loader",
    "image_model_kwargs",
    "list_methods",
    "register_method",
]

BUILTIN_METHODS = ("fastmae.methods.mae", "fastmae.methods.simmim", "fastmae.methods.videomae", "fastmae.methods.crossmae")

_METHODS: dict[str, MethodSpec] = {}


def image_model_kwargs(cfg) -> dict:
    """The factory arguments every image model takes from a run config: image size, patch size (0 = the model's)."""
    kw: dict = dict(img_size=cfg.data.img_size)
    if cfg.model.patch_size:
        kw["patch_size"] = cfg.model.patch_size
    return kw


def image_loader(cfg, rank: int, world_size: int, device, split: str, output: str):
    """The image loader of a run config (``fastmae.data.build_loader``); ``data="demo"`` is built offline and cached."""
    from fastmae.data import build_loader

    train = split == "train"
    return build_loader(
        cfg.data.path, split=split, batch_size=cfg.optim.batch_size, img_size=cfg.data.img_size, loader=cfg.data.loader,
        output=output, train=train, num_workers=cfg.data.num_workers, seed=cfg.seed, rank=rank, world_size=world_size,
        device=str(device), drop_last=train, holdout_fraction=cfg.data.holdout_fraction,
        augment=(cfg.data.augment or None) if train else None, index_cache=_scan_index_dir(cfg),
        decode=cfg.data.decode, repeat_samples=cfg.data.repeat_samples if train else 1, dali_decode=cfg.data.dali_decode,
    )


def _scan_index_dir(cfg) -> str | None:
    """The scan index kept beside the run (``OUTPUT_DIR/scan-index``): a requeued job re-reads no unchanged file."""
    out = cfg.output_dir
    return os.path.join(out, "scan-index") if out else None


@dataclass
class MethodConfig:
    """A method's own run keys, ``cfg.method``: ``name`` (the registered method) plus the fields a method's
    subclass declares (``MethodSpec.config``). A key of another method is refused when given as a flag."""

    name: str = field(default="mae", metadata={"flat": "method", "help": "pretraining method (a registered one: mae, "
                                                                          "simmim, videomae, crossmae)"})

    def validate(self, cfg) -> None:
        """One-line ValueError for a bad key; ``cfg`` is the whole run config (for constraints across sections)."""


def no_flops(model: nn.Module, cfg) -> float | None:
    return None


def no_visualization(model: nn.Module, batch: Tensor, mask_ratio: float, noise: Tensor, path: Path | None, mean, std):
    return None


@dataclass(frozen=True)
class MethodSpec:
    """What the training loop, config and evaluation need to know about one method.

    name: the ``--method`` value.
    models: {model name: factory(**kwargs) -> nn.Module}; names are ``<method>_<architecture>``.
    model_kwargs: run config -> factory keyword arguments.
    noise_shape: (model, batch) -> the shape of the uniform noise its forward ranks into a mask.
    presets: {preset name: ``PretrainConfig`` field overrides}; ``default_preset`` is the one
        ``--method=<name>`` picks without ``--preset``.
    size_siblings_of: model-name prefixes whose same-size model this method substitutes, so that
        ``--method=<name>`` on another method's preset picks ``<name>_<architecture>``.
    build_loader: (cfg, rank, world_size, device, split, output) -> loader of ``(batch, labels)``
        with ``steps_per_epoch``, ``set_epoch``, ``state_dict``, ``load_state_dict``;
        output "float" gives the normalized float layout, "uint8" the raw one.
    flops_per_image: (model, cfg) -> training FLOPs per sample, or None when not counted (no MFU).
    visualize: (model, batch, mask_ratio, noise, path, mean, std) -> the picture written, or None;
        ``path=None`` runs the forward without writing (FSDP ranks other than 0).
    unit: what one sample is ("images", "clips").
    config: the dataclass of the method's own keys (a :class:`MethodConfig`), what ``cfg.method`` is.
    """

    name: str
    models: Mapping[str, Callable[..., nn.Module]]
    model_kwargs: Callable[[Any], dict]
    noise_shape: Callable[[nn.Module, Tensor], tuple[int, ...]]
    presets: Mapping[str, dict] = field(default_factory=dict)
    default_preset: str = ""
    size_siblings_of: tuple[str, ...] = ()
    build_loader: Callable[..., Any] = image_loader
    flops_per_image: Callable[[nn.Module, Any], float | None] = no_flops
    visualize: Callable[..., Path | None] = no_visualization
    unit: str = "images"
    config: type[MethodConfig] = MethodConfig

    def resolve_model(self, name: str) -> str:
        """``name`` itself, or this method's same-size sibling of another method's model."""
        if name in self.models:
            return name
        for prefix in self.size_siblings_of:
            if name.startswith(prefix) and f"{self.name}_{name[len(prefix):]}" in self.models:
                return f"{self.name}_{name[len(prefix):]}"
        raise ValueError(f"model {name!r} is not a {self.name} model; choose one of {sorted(self.models)}")

    def build_model(self, cfg) -> nn.Module:
        return self.models[self.resolve_model(cfg.model.name)](**self.model_kwargs(cfg))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, mask_ratio: float,
                 amp_dtype: torch.dtype = torch.float32, seed: int = 1234, keep: int = 0) -> dict:
        """Held-out loss with fixed masks: one pass of ``loader``.

        The noise comes from a private generator (``seed``), so the number is comparable across runs and
        the training RNG stays untouched. Returns {"loss": mean loss per sample (None if empty),
        "count": samples, "unit": self.unit}, plus "sample": (first ``keep`` samples, their noise) when ``keep``.
        """
        gen = torch.Generator().manual_seed(seed)
        was_training = model.training
        model.eval()
        total, count, sample = 0.0, 0, None
        for batch, _ in loader:
            batch = batch.to(device)
            noise = torch.rand(self.noise_shape(model, batch), generator=gen).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                loss = model(batch, mask_ratio=mask_ratio, noise=noise)[0]
            total += loss.item() * batch.shape[0]  # evaluation, not the training step: a sync per batch is fine
            count += batch.shape[0]
            if keep and sample is None:
                sample = (batch[:keep], noise[:keep])
        model.train(was_training)
        out = {"loss": total / count if count else None, "count": count, "unit": self.unit}
        if sample is not None:
            out["sample"] = sample
        return out


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` available under ``spec.name``; a name can be registered once."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for module in BUILTIN_METHODS:
        importlib.import_module(module)


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        module = f"fastmae.methods.{name}"
        if module in BUILTIN_METHODS:
            importlib.import_module(module)
        else:
            _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def find_model(name: str) -> tuple[MethodSpec, Callable[..., nn.Module]] | None:
    """The method and factory of a model name, or None if no method has it."""
    for method in list_methods():
        spec = _METHODS[method]
        if name in spec.models:
            return spec, spec.models[name]
    return None


def build_meta_model(name: str) -> nn.Module | None:
    """The named model with shapes but no storage (meta device), for architecture facts such as head counts."""
    found = find_model(name)
    if found is None:
        return None
    with torch.device("meta"):
        return found[1]()
