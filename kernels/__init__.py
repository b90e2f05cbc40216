"""Triton kernels of fastmae, installed as ``fastmae.kernels``.

Kernels take tensors and ids only: they import nothing of the model, data or
training engine. Modules (each imports triton, so none is imported here; under
``TRITON_INTERPRET=1`` set the variable before importing them):

- ``patchify_gather``: K1, fused patchify + uint8 normalization + gather of the visible patches;
- ``unshuffle_scatter``: K2, decoder input (unshuffle + mask token + positions) and its backward;
- ``masked_recon_loss``: K3, norm-pix MSE / L1 on the masked patches, forward and gradient in one pass.

The public entry points with device dispatch and ``torch.library`` registration are in ``fastmae.ops``.
"""
