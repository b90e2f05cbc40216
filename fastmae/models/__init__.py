"""MAE and ViT models with the official parameter names."""

from fastmae.models.crossmae import CROSSMAE_MODELS, CrossMAE, crossmae_vit_base_patch16, crossmae_vit_tiny
from fastmae.models.mae import (
    MAE,
    MODELS,
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny,
)
from fastmae.models.vit import VisionTransformer

__all__ = [
    "CROSSMAE_MODELS",
    "CrossMAE",
    "crossmae_vit_base_patch16",
    "crossmae_vit_tiny",
    "MAE",
    "MODELS",
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "mae_vit_tiny",
]
