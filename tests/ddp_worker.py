"""Run by tests/test_distributed.py under torchrun (or alone): a few MAE steps on a fixed global batch.

Every rank takes its slice of the same global batch and noise, so the
result can be compared with one process running the whole batch.
Usage: ddp_worker.py OUT_PREFIX GLOBAL_BATCH STEPS
"""

import sys

import torch

from fastmae import mae_vit_tiny
from fastmae.engine.distributed import init_distributed, shutdown, wrap_model
from fastmae.engine.optim import build_adamw


def main(prefix: str, global_batch: int, steps: int) -> None:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = mae_vit_tiny(img_size=32, patch_size=4, norm_pix_loss=True)
    ddp = wrap_model(model, info, fsdp=False)
    opt = build_adamw(model, torch.tensor(1e-3), 0.05, (0.9, 0.95), info.device)
    local = global_batch // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    data = torch.Generator().manual_seed(123)
    no_skip = torch.zeros(())
    first_grads = {}
    for step in range(steps):
        x = torch.randn(global_batch, 3, 32, 32, generator=data)
        noise = torch.rand(global_batch, 64, generator=data)
        loss = ddp(x[rows], 0.75, noise[rows])[0]
        loss.backward()
        if step == 0:
            first_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.found_inf = no_skip
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({"params": model.state_dict(), "grads": first_grads}, f"{prefix}{info.rank}.pt")
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
