"""The checkpointed state of a training run: build it (every rank), write it (rank 0), restore it.

A checkpoint holds the model and optimizer (full, unsharded state dicts with the official
parameter names), the grad scaler, the step, the data position and every rank's RNG states, so
``--resume`` continues bit-identically. ``ckpt_format="dcp"`` writes the same content as a DCP folder
(:mod:`fastmae.engine.dcp`): under FSDP every rank writes its own shards (nothing gathered), otherwise rank 0
writes in a background thread while the ranks step on. Restoring re-installs the shared learning-rate tensor in the
optimizer groups (``load_state_dict`` installs a copy, the schedule writes into the shared one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fastmae
from fastmae.engine import dcp
from fastmae.engine.checkpoint import prune_checkpoints, rng_state, save_checkpoint, set_rng_state
from fastmae.engine.distributed import DistInfo, full_train_state, load_train_state
from fastmae.engine.step import TrainingAborted

_NON_FINITE = "parameters became non-finite; not writing a checkpoint"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


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
    ckpt_format: str = "file"  # file (one .pt on rank 0) | dcp (a folder: sharded under FSDP, else asynchronous)
    saver: dcp.AsyncSaver = field(default_factory=dcp.AsyncSaver, repr=False)

    def __post_init__(self) -> None:
        if self.ckpt_format == "dcp":
            dcp.preload()

    def state_dict(self, step: int) -> dict | None:
        """The checkpoint at ``step`` on rank 0, None on the others. A collective: every rank must call it."""
        model_sd, optim_sd = full_train_state(self.model, self.optimizer, sharded=self.sharded)
        rest = self._rest(step)
        if rest is None:
            return None
        # Deliberate sync: a non-finite model must never reach the disk.
        if not all(torch.isfinite(v).all() for v in model_sd.values() if v.is_floating_point()):
            raise TrainingAborted(_NON_FINITE)
        return {**self.extra, "model": model_sd, "optimizer": optim_sd, **rest}

    def _rest(self, step: int) -> dict | None:
        """Everything but model and optimizer on rank 0 (None on the others); a collective: every rank's RNGs."""
        rngs = rng_state()
        if self.info.enabled:
            gathered = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rngs)
            rngs = gathered
        if not self.info.is_main:
            return None
        state = {"step": step, "epoch": step // self.steps_per_epoch, "data": self.loader.state_dict(), "rng": rngs,
                 "config": self.config, "versions": {"torch": str(torch.__version__), "fastmae": fastmae.__version__}}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, run_dir: Path, step: int, keep: int, blocking: bool = False) -> Path | None:
        """Write checkpoint ``step`` atomically (rank 0 returns its path, the others None), keeping the last ``keep``.

        ``ckpt_format="dcp"`` off FSDP returns as soon as rank 0 holds a CPU copy; the write goes on in the
        background (the returned folder appears when it is complete) unless ``blocking`` (the preemption save).
        """
        if self.ckpt_format == "dcp" and self.sharded:
            return self._save_shards(run_dir, step, keep)
        state = self.state_dict(step)
        if state is None:
            return None
        if self.ckpt_format != "dcp":
            return save_checkpoint(run_dir, step, state, keep)
        if not blocking:
            return self.saver.start(run_dir, step, state, after=lambda _: prune_checkpoints(run_dir, step, keep))
        self.saver.wait()  # deliberate sync: the write in flight lands (or raises) before this one starts
        path = dcp.save_local(run_dir, step, state)
        prune_checkpoints(run_dir, step, keep)
        return path

    def _save_shards(self, run_dir: Path, step: int, keep: int) -> Path | None:
        """FSDP + dcp: each rank writes the shards it holds; a collective."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # Deliberate sync (a save point): every rank's shards are finite, or nobody writes.
        finite = torch.tensor([int(all(torch.isfinite(_local(v)).all() for v in model_sd.values()
                                       if v.is_floating_point()))], device=self.info.device)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        rest = self._rest(step)
        if not finite.item():
            raise TrainingAborted(_NON_FINITE)
        skeleton, tensors = dcp.split_tensors({**self.extra, "model": model_sd, "optimizer": optim_sd, **(rest or {})})
        path = dcp.save_sharded(run_dir, step, tensors, skeleton, self.info.rank)
        if path is not None:
            prune_checkpoints(run_dir, step, keep)
        return path

    def finish_saves(self) -> Path | None:
        """Wait for the background write in flight (end of the run, before a blocking save); raises its error."""
        return self.saver.wait()

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
