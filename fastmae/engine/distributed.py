"""Process-group setup for ``torchrun`` (NCCL on GPU, gloo on CPU) and model wrapping (DDP or FSDP2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank) if pref == "cuda" else torch.device(pref)
    return torch.device("cpu")


def init_distributed(device_pref: str) -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for blk in list(getattr(model, "blocks", [])) + list(getattr(model, "decoder_blocks", [])):
            fully_shard(blk)
        fully_shard(model)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def full_train_state(model: nn.Module, optimizer, sharded: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (a collective when ``sharded``), official parameter names."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_train_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict, sharded: bool) -> None:
    """Inverse of :func:`full_train_state`: every rank passes the full state, each keeps its shards."""
    if not sharded:
        from fastmae.convert import load_into

        load_into(model, model_sd, strict=True)  # names every mismatching key and shape
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=True))


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
