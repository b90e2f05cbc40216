"""The official MAE initialization of linear and LayerNorm layers (applied with ``module.apply``)."""

from __future__ import annotations

from torch import nn


def init_weights(m: nn.Module) -> None:
    """Linear: xavier-uniform weight, zero bias; LayerNorm: unit weight, zero bias; anything else untouched."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
