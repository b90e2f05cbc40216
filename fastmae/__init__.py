"""fastmae: a performance-engineered Masked Autoencoder pretraining stack.

The model names below are imported on first use, so that ``import fastmae.cli`` (the ``fastmae`` command)
does not load torch before it has chosen OpenMP's settings (:mod:`fastmae.threads`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "MAE",
    "CrossMAE",
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "mae_vit_tiny",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("fastmae.models"), name)
    raise AttributeError(f"module 'fastmae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
