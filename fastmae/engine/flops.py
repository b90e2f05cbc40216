"""Analytic FLOP count of an MAE training step (matmuls only; 1 multiply-add = 2 FLOPs) and GPU peaks.

Peaks are looked up by the exact name ``torch.cuda.get_device_name`` returns:
a substring match would give an H100 PCIe (756 TF) the SXM part's 989 TF and
under-report its MFU by a quarter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuSpec:
    """Vendor data-sheet figures of one GPU model (dense bf16 tensor-core peak, no sparsity)."""

    key: str  # the --gpu name
    label: str
    peak_tflops: float
    hbm_tbs: float  # memory bandwidth, TB/s
    mem_gib: float  # usable device memory, GiB (what torch.cuda.mem_get_info reports, roughly)
    device_names: tuple[str, ...]  # torch.cuda.get_device_name() strings of this part


# Sources (dense = the data sheets' sparse figure / 2):
# - H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), BF16 1,979 /
#   1,513 / 1,671 TF with sparsity; HBM 3.35 / 2.0 / 3.9 TB/s. The SXM part reports itself as "NVIDIA H100 80GB HBM3".
# - H200 / H200 NVL: NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), BF16 1,979 / 1,671 TF sparse, 4.8 TB/s.
# - A100: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), BF16 312 TF dense;
#   2,039 GB/s (80GB SXM), 1,935 GB/s (80GB PCIe), 1,555 GB/s (40GB).
# - L40S: NVIDIA L40S datasheet, BF16 362.05 TF dense (733 sparse), 864 GB/s GDDR6, 48 GB.
# - B200: NVIDIA DGX/HGX B200 datasheets, FP16/BF16 4.5 PF sparse per GPU = 2,250 dense, 8 TB/s HBM3e, 180 GB.
GPUS: dict[str, GpuSpec] = {
    s.key: s
    for s in (
        GpuSpec("h100", "H100 SXM 80GB", 989.4, 3.35, 79.1, ("NVIDIA H100 80GB HBM3",)),
        GpuSpec("h100_pcie", "H100 PCIe 80GB", 756.5, 2.0, 79.1, ("NVIDIA H100 PCIe",)),
        GpuSpec("h100_nvl", "H100 NVL 94GB", 835.5, 3.9, 93.1, ("NVIDIA H100 NVL",)),
        GpuSpec("h200", "H200 SXM 141GB", 989.4, 4.8, 139.7, ("NVIDIA H200",)),
        GpuSpec("h200_nvl", "H200 NVL 141GB", 835.5, 4.8, 139.7, ("NVIDIA H200 NVL",)),
        GpuSpec("a100", "A100 SXM4 80GB", 312.0, 2.039, 79.1, ("NVIDIA A100-SXM4-80GB",)),
        GpuSpec("a100_pcie", "A100 PCIe 80GB", 312.0, 1.935, 79.1, ("NVIDIA A100 80GB PCIe",)),
        GpuSpec("a100_40gb", "A100 40GB", 312.0, 1.555, 39.4, ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB")),
        GpuSpec("l40s", "L40S 48GB", 362.05, 0.864, 44.4, ("NVIDIA L40S",)),
        GpuSpec("b200", "B200 180GB", 2250.0, 8.0, 178.4, ("NVIDIA B200",)),
    )
}
_BY_NAME = {name: spec for spec in GPUS.values() for name in spec.device_names}


def gpu_spec(name: str) -> GpuSpec | None:
    """The spec of a device name exactly as ``torch.cuda.get_device_name`` spells it, or None if unknown."""
    return _BY_NAME.get(name.strip())


def _transformer(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    per_block = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim  # qkv, proj
    per_block += 2 * 2 * tokens * dim * int(dim * mlp_ratio)  # fc1, fc2
    per_block += 2 * 2 * tokens * tokens * dim  # QK^T and AV
    return depth * per_block


def mae_forward_flops(model, img_size: int, mask_ratio: float) -> float:
    """Forward FLOPs per image of a fastmae MAE at ``img_size`` and ``mask_ratio``."""
    p = model.patch_size
    L = (img_size // p) ** 2
    vis = int(L * (1 - mask_ratio))
    P = p * p * model.in_chans
    D, Dd = model.embed_dim, model.decoder_embed_dim
    mlp = model.blocks[0].mlp.fc1.out_features / D
    f = 2 * vis * P * D
    f += _transformer(1 + vis, D, len(model.blocks), mlp)
    f += 2 * (1 + vis) * D * Dd
    f += _transformer(1 + L, Dd, len(model.decoder_blocks), mlp)
    f += 2 * L * Dd * P
    return float(f)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device if its exact name is known (override with FASTMAE_PEAK_TFLOPS)."""
    if os.environ.get("FASTMAE_PEAK_TFLOPS"):
        return float(os.environ["FASTMAE_PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        spec = gpu_spec(torch.cuda.get_device_name(device))
        return spec.peak_tflops * 1e12 if spec else None
    return None
