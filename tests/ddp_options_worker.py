"""Run by tests/test_ddp_options.py as one of 2 gloo ranks: the gradients DDP hands back, with and without bf16
gradient compression, and the wrapper's settings. Usage: ddp_options_worker.py OUT_PREFIX (RANK etc. from env)."""

import sys

import torch
from torch import nn

from fastmae.engine.distributed import WrapOptions, init_distributed, shutdown, wrap_model


def model_and_batch(rank: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 + rank))
    return model, x


def main(prefix: str) -> None:
    info = init_distributed("cpu")
    out = {}
    for compression in ("none", "bf16"):
        model, x = model_and_batch(info.rank)
        ddp = wrap_model(model, info, fsdp=False, options=WrapOptions(grad_compression=compression))
        ddp(x).square().mean().backward()
        out[compression] = {k: p.grad.clone() for k, p in model.named_parameters()}
        out[f"{compression}_flags"] = torch.tensor([ddp.gradient_as_bucket_view, ddp.broadcast_buffers])
    torch.save(out, f"{prefix}{info.rank}.pt")
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1])
