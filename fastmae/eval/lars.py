"""LARS (You et al. 2017) as used by MAE's linear probe.

For a parameter ``p`` with gradient ``g``, learning rate ``lr``, momentum ``m``,
weight decay ``wd`` and trust coefficient ``eta``:

    if p is adapted (ndim > 1):  d = g + wd * p
                                 d = d * (eta * |p| / |d|)   when |p| > 0 and |d| > 0, else d
    else (biases, norms):        d = g
    buf = m * buf + d            (buf starts at 0)
    p   = p - lr * buf

Biases and normalization parameters get neither weight decay nor the trust
ratio. The ratio is computed with ``torch.where`` on device: no host sync.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @staticmethod
    def is_adapted(p: torch.Tensor) -> bool:
        """Weights (ndim > 1) get weight decay and the trust ratio; biases and norms do not."""
        return p.ndim > 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom, eta = group["lr"], group["weight_decay"], group["momentum"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if self.is_adapted(p):
                    d = d.add(p, alpha=wd) if wd else d.clone()
                    p_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm, one)
                    d.mul_(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(d)
                p.add_(buf, alpha=-lr)
        return loss
