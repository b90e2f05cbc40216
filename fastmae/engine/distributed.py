"""Process-group setup for ``torchrun`` (NCCL on GPU, gloo on CPU) and model wrapping (DDP or FSDP2)."""

from __future__ import annotations

import os
import sys
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


def configure_rank_env(env=None, cores: int | None = None) -> dict[str, str]:
    """Per-rank settings torchrun does not make; what the user set wins. Returns what was set.

    - ``TORCHINDUCTOR_COMPILE_THREADS``: Inductor sizes its compile pool by the machine's cores, in every rank: 8
      ranks on 64 cores would start 8 x 64 workers. Each rank gets cores / local ranks instead.
    - ``GLOO_SOCKET_IFNAME``: the preemption vote runs on a gloo group; on multi-node jobs gloo binds the interface
      the host name resolves to, which on clusters is often not the one between the nodes. When only
      ``NCCL_SOCKET_IFNAME`` is given, gloo takes the same interface.
    """
    env = os.environ if env is None else env
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    if cores is None:  # the cores this process may use (a cgroup or taskset may give fewer than the machine has)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    changes = {}
    if "TORCHINDUCTOR_COMPILE_THREADS" not in env:
        changes["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, cores // local))
    if "GLOO_SOCKET_IFNAME" not in env and env.get("NCCL_SOCKET_IFNAME"):
        changes["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"]
    env.update(changes)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and "TORCHINDUCTOR_COMPILE_THREADS" in changes and env is os.environ:
        inductor.compile_threads = int(changes["TORCHINDUCTOR_COMPILE_THREADS"])  # read at its import: set it too
    return changes


def init_distributed(device_pref: str) -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if world > 1:
        configure_rank_env()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


@dataclass(frozen=True)
class WrapOptions:
    """How the model is spread over the ranks. ``param_dtype``: FSDP2's compute dtype for gathered parameters
    (None = the stored fp32); gradients are always reduced in fp32. ``grad_compression``: DDP all-reduce in
    "bf16" (half the bytes, gradients rounded to bf16 before the sum) or "none". ``hsdp``: FSDP2 shards within a
    node and replicates across nodes (a 2-D mesh of nodes x ``local_world_size``)."""

    param_dtype: torch.dtype | None = None
    grad_compression: str = "none"
    hsdp: bool = False
    local_world_size: int = 0  # 0 = LOCAL_WORLD_SIZE from torchrun, else the whole world (one node)


def hsdp_mesh_shape(world_size: int, local_world_size: int) -> tuple[int, int]:
    """(replicas, shards) of an HSDP mesh: one replica per node, one shard per GPU of a node."""
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local < 1 or world_size % local:
        raise ValueError(f"hsdp needs the world size ({world_size}) to be a multiple of the GPUs per node ({local})")
    return world_size // local, local


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool, options: WrapOptions | None = None) -> nn.Module:
    if not info.enabled:
        return model
    options = options or WrapOptions()
    if fsdp:
        return _fully_shard(model, info, options)
    ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients live in the all-reduce buckets (no copy in and out of them); buffers (none in an MAE: the position
    # embeddings are fixed parameters) are not re-broadcast before every forward.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                              broadcast_buffers=False)
    if options.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        ddp.register_comm_hook(state=None, hook=bf16_compress_hook)
    elif options.grad_compression != "none":
        raise ValueError(f"grad_compression must be none or bf16, got {options.grad_compression!r}")
    return ddp


def _fully_shard(model: nn.Module, info: DistInfo, options: WrapOptions) -> nn.Module:
    """FSDP2 per block and at the root: parameters gathered in ``param_dtype``, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict = {"mp_policy": MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=torch.float32)}
    if options.hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        kw["mesh"] = init_device_mesh(info.device.type, hsdp_mesh_shape(info.world_size, options.local_world_size),
                                      mesh_dim_names=("replicate", "shard"))
    for blk in list(getattr(model, "blocks", [])) + list(getattr(model, "decoder_blocks", [])):
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


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


def agree(info: DistInfo, value):
    """Rank 0's ``value`` on every rank: a verdict (e.g. an error to raise) that every rank must act on alike."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
