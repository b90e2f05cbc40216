"""Public fused ops of fastmae, one entry point per op.

For now every op runs its eager twin from ``fastmae.reference``; the kernels
issue turns this module into the device dispatch (Triton on CUDA, reference on
CPU, ``FASTMAE_KERNELS`` to force either). The model calls only these names.
"""

from __future__ import annotations

from fastmae.reference import masked_recon_loss, patchify_gather, unshuffle_scatter

__all__ = ["patchify_gather", "unshuffle_scatter", "masked_recon_loss"]
