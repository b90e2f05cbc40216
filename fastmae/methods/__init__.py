"""The masked-image-modeling family on one stack: MAE, SimMIM and VideoMAE, one registered method per module.

Every model's ``forward(batch, mask_ratio=..., noise=None)`` returns ``(loss, pred, mask)``, so the
training step is the same for all of them; everything else a method needs is in its
:class:`~fastmae.methods.registry.MethodSpec` (see ``registry.py`` for how to add one).
"""

from fastmae.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method"]
