"""FP8 training of the transformer blocks' linears through torchao's float8 (``--fp8=tensorwise|rowwise``).

Only the GEMMs that carry the FLOPs are swapped: ``qkv``, ``proj``, ``fc1`` and ``fc2`` of every encoder and decoder
block (~97% of ViT-B's GEMM FLOPs). The patch embedding (a convolution), ``decoder_embed``, ``decoder_pred``, any
head and every norm stay in bf16: they are a few percent of the FLOPs and sit where the values have the widest
range (pixels in, pixels out). torchao's ``Float8Linear`` is an ``nn.Linear`` with the same ``weight``/``bias``
parameters, so checkpoints keep their names and load into the bf16 model, timm and transformers unchanged.

torchao is imported here only, on use (the ``fp8`` extra). On CUDA it needs FP8 tensor cores (sm_89+); on the CPU
torchao emulates the scaled GEMMs, which is how the tests run the same conversion.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# The block linears, by their official MAE names.
BLOCK_LINEAR = re.compile(r"^(blocks|decoder_blocks)\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$")
# torch._scaled_mm needs both GEMM dimensions divisible by 16.
FP8_ALIGN = 16


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 training cannot run here, or None: the one capability check (torchao importable, FP8 tensor cores)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"--fp8 needs torchao (pip install '.[fp8]'): {e}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"--fp8 needs FP8 tensor cores (sm_89+: L40S, H100, B200); this GPU is sm_{major}{minor}"
    return None


def fp8_plan(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(linears to swap, {linear left in bf16: why}) by module name."""
    swap, skip = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if not BLOCK_LINEAR.match(name):
            skip[name] = "not a block linear (embedding, prediction or head: kept bf16)"
        elif mod.in_features % FP8_ALIGN or mod.out_features % FP8_ALIGN:
            skip[name] = f"{mod.in_features}x{mod.out_features} is not a multiple of {FP8_ALIGN} (scaled GEMM)"
        else:
            swap.append(name)
    return swap, skip


def convert_fp8(model: nn.Module, mode: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Swap the block linears of ``model`` for torchao's Float8Linear with the ``mode`` recipe, in place.

    Returns (swapped names, {skipped name: why}). Raises ValueError with a one-line reason when FP8 cannot run.
    """
    if mode not in ("tensorwise", "rowwise"):
        raise ValueError(f"fp8 must be off, tensorwise or rowwise, got {mode!r}")
    why = fp8_unavailable(device)
    if why:
        raise ValueError(why)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    swap, skip = fp8_plan(model)
    chosen = set(swap)
    convert_to_float8_training(model, module_filter_fn=lambda _mod, fqn: fqn in chosen,
                               config=Float8LinearConfig.from_recipe_name(mode))
    return swap, skip
