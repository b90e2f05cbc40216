"""fastmae: a performance-engineered Masked Autoencoder pretraining stack."""

from fastmae.models import (
    MAE,
    CrossMAE,
    MaskedAutoencoderViT,
    VisionTransformer,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny,
)

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
