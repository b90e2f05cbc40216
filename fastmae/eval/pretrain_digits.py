"""A tiny MAE (or another registered masked-image method) pretrained in memory on the digits' training
split (labels unused), for the demo, sweeps and tests.

Uses the library's own models, optimizer, schedule and step (the method's registered model, ``build_adamw``,
``lr_at``, ``train_step``); the held-out images are never seen.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from fastmae.engine.optim import build_adamw, lr_at
from fastmae.engine.step import StepStats, train_step
from fastmae.methods.registry import get_method
from fastmae.models.vit import LayerNorm6


def tiny_digits_model(arch: dict, decoder_dim: int = 64, decoder_depth: int = 2, norm_pix_loss: bool = False,
                      pixel_mean=None, pixel_std=None, method: str = "mae", **method_kwargs) -> nn.Module:
    """The digits encoder ``arch`` with ``method``'s decoder, built by the factory of the method's default preset
    (so its own defaults hold: CrossMAE keeps prediction ratio 0.25 and feature fusion unless ``method_kwargs``
    say otherwise)."""
    spec = get_method(method)
    factory = spec.models[spec.resolve_model(spec.presets[spec.default_preset]["model"])]
    C = arch["in_chans"]
    try:
        return factory(
            **arch, decoder_embed_dim=decoder_dim, decoder_depth=decoder_depth, decoder_num_heads=4,
            norm_layer=LayerNorm6, norm_pix_loss=norm_pix_loss,
            pixel_mean=tuple(pixel_mean or (0.5,) * C), pixel_std=tuple(pixel_std or (0.5,) * C), **method_kwargs,
        )
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"method {method!r} has no digits-demo model taking these keywords ({e})") from None


def pretrain(model: nn.Module, x: Tensor, *, epochs: int, batch_size: int = 128, blr: float = 1.5e-3,
             warmup_epochs: float = 5.0, weight_decay: float = 0.05, mask_ratio: float = 0.75, seed: int = 0,
             log_every: int = 0) -> dict:
    """x: (N, C, H, W) normalized images. Trains in place through the engine's step (``train_step``, as
    ``fastmae pretrain`` does); returns {'losses': per-epoch mean, 'wall_s', 'steps', 'skipped'}."""
    if len(x) < batch_size:
        raise ValueError(f"{len(x)} images are fewer than one batch of {batch_size}")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    steps_per_epoch = len(x) // batch_size
    base_lr = blr * batch_size / 256
    lr_t = torch.tensor(0.0, device=device)
    optimizer = build_adamw(model, lr_t, weight_decay, (0.9, 0.95), device)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = StepStats.zeros(device)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(epochs):
        batches = iter(x[torch.randperm(len(x), generator=gen).to(device)].split(batch_size)[:steps_per_epoch])
        total = torch.zeros((), device=device)
        for _ in range(steps_per_epoch):
            lr_t.fill_(lr_at(step, steps_per_epoch, warmup_epochs, epochs, base_lr, 0.0))
            loss, _ = train_step(model, optimizer, params, batches.__next__, mask_ratio=mask_ratio, stats=stats)
            total += loss
            step += 1
        losses.append(total)
        if log_every and (epoch + 1) % log_every == 0:
            print(f"pretrain epoch {epoch + 1}/{epochs} loss {total.item() / steps_per_epoch:.4f}", flush=True)
    # Deliberate sync, once at the end: the per-epoch losses and the skipped-step count.
    return {"losses": [v.item() / steps_per_epoch for v in losses], "wall_s": time.perf_counter() - t0, "steps": step,
            "skipped": int(stats.bad_total.item())}
