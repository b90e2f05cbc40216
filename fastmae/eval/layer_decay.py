"""Layer-wise learning-rate decay for fine-tuning a ViT (BEiT / MAE recipe).

A model with L blocks has layers 0..L+1: the embeddings (``cls_token``,
``pos_embed``, ``patch_embed``) are layer 0, ``blocks.i`` is layer i + 1, and
everything after the blocks (final norm, ``fc_norm``, head) is layer L + 1. A
parameter of layer ``l`` gets ``lr_scale = decay ** (L + 1 - l)``, so the head
trains at the full rate and each block below at ``decay`` times the one above.
Biases, 1-D parameters (norms) and the position/cls embeddings get no weight decay.
"""

from __future__ import annotations

from torch import nn

NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "dist_token")
_EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed", "mask_token", "dist_token")


def layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter name, given ``num_layers`` = number of blocks."""
    if name.startswith(_EMBEDDINGS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY) -> list[dict]:
    """One group per (layer, decay / no decay) holding the trainable parameters, each with ``lr_scale``.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    num_layers = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name.endswith(".bias") or name in no_weight_decay)
        lid = layer_id(name, num_layers)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "layer_id": lid,
                           "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers + 1 - lid)}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
