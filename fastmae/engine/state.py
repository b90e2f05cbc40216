"""The checkpointed state of a training run: build it (every rank), write it (rank 0), restore it.

A checkpoint holds the model and optimizer (full, unsharded state dicts with the official
parameter names), the grad scaler, the step, the data position and every rank's RNG states, so
``--resume`` continues bit-identically. Restoring re-installs the shared learning-rate tensor in the
optimizer groups (``load_state_dict`` installs a copy, the schedule writes into the shared one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastmae
from fastmae.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
from fastmae.engine.distributed import DistInfo, full_train_state, load_train_state
from fastmae.engine.step import TrainingAborted


@dataclass
class TrainState:
    """References to everything a checkpoint covers; ``loader`` has ``state_dict``/``load_state_dict``.

    ``lr``: the shared learning-rate tensor of the optimizer groups, or None when the loop sets a float per
    group (the evaluation protocols' LARS and layer-decayed AdamW). ``extra``: more entries of the checkpoint
    (an evaluation run's history and architecture), read when a checkpoint is written.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    lr: Tensor | None
    info: DistInfo
    sharded: bool = False  # FSDP: state dicts are gathered from (and scattered to) every rank
    scaler: torch.amp.GradScaler | None = None
    steps_per_epoch: int = 1
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def state_dict(self, step: int) -> dict | None:
        """The checkpoint at ``step`` on rank 0, None on the others. A collective: every rank must call it."""
        model_sd, optim_sd = full_train_state(self.model, self.optimizer, sharded=self.sharded)
        rngs = rng_state()
        if self.info.enabled:
            gathered = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rngs)
            rngs = gathered
        if not self.info.is_main:
            return None
        # Deliberate sync: a non-finite model must never reach the disk.
        if not all(torch.isfinite(v).all() for v in model_sd.values() if v.is_floating_point()):
            raise TrainingAborted("parameters became non-finite; not writing a checkpoint")
        state = {
            "model": model_sd, "optimizer": optim_sd, "step": step, "epoch": step // self.steps_per_epoch,
            "data": self.loader.state_dict(), "rng": rngs, "config": self.config,
            "versions": {"torch": str(torch.__version__), "fastmae": fastmae.__version__},
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return {**self.extra, **state}

    def save(self, run_dir: Path, step: int, keep: int) -> Path | None:
        """Write checkpoint ``step`` atomically (rank 0; the others return None), keeping the last ``keep``."""
        state = self.state_dict(step)
        return save_checkpoint(run_dir, step, state, keep) if state is not None else None

    def load_state_dict(self, ckpt: dict) -> int:
        """Restore a checkpoint on every rank; returns its step."""
        load_train_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"], sharded=self.sharded)
        if self.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"][self.info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        return ckpt["step"]
