"""Optimizers of the evaluation protocols, built from timm's: LARS for the linear probe, AdamW with layer-wise lr decay.

LARS (You et al. 2017), MAE's linear-probe optimizer, is ``timm.optim.Lars`` with
two parameter groups: weights (ndim > 1) get weight decay and the trust ratio
(``always_adapt``), biases and norms get neither (plain momentum SGD). timm's
trust ratio is ``eta * |w| / (|g| + wd * |w| + eps)`` (NVIDIA LARC) where MAE's
is ``eta * |w| / |g + wd * w|``: the two agree exactly at ``weight_decay = 0``,
which is the official probe recipe (Table 10), and ``eps = 0`` keeps them equal
there; with weight decay timm's denominator is the triangle-inequality bound of
MAE's, so steps are at most as large. That difference does not touch the
recipe, hence timm's optimizer rather than a copy of MAE's.

Layer-wise lr decay (BEiT / MAE) is timm's ``param_groups_layer_decay`` driven
by ``VisionTransformer.group_matcher``: the embeddings are layer 0, block i is
layer i + 1, the final norm / fc_norm / head are layer L + 1, and a parameter of
layer l gets ``lr_scale = decay ** (L + 1 - l)``. Biases, 1-D parameters,
``cls_token`` and ``pos_embed`` get no weight decay; frozen parameters are left out.
"""

from __future__ import annotations

import torch
from timm.optim import Lars
from timm.optim import param_groups_layer_decay as timm_layer_decay_groups
from torch import nn

NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


def lars(params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001) -> Lars:
    """LARS over the trainable tensors in ``params`` with MAE's exclusions (see the module docstring)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if trust_coefficient <= 0:
        raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True, "lr_scale": 1.0},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False, "lr_scale": 1.0},
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coefficient, eps=0.0)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups of the trainable parameters, each with ``lr_scale`` and ``weight_decay``."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    return timm_layer_decay_groups(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY, layer_decay=layer_decay)


def adamw_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float, betas: tuple[float, float],
                      device: torch.device) -> torch.optim.AdamW:
    from fastmae.engine.optim import fused_adamw_supported

    return torch.optim.AdamW(param_groups_layer_decay(model, weight_decay, layer_decay), lr=0.0, betas=betas,
                             fused=fused_adamw_supported(device))
