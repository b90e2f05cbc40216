"""Triton kernels of fastmae, installed as ``fastmae.kernels``.

Each module holds only ``@triton.jit`` kernels (a shape comment per pointer) and their
launchers (``*_fwd``, ``*_bwd``: check the inputs, allocate outputs, pick block sizes,
launch). There is no autograd here: ``fastmae.ops`` owns the ``torch.library`` custom ops,
their fake implementations and their backward, so the path the tests and benchmarks
exercise is the one that trains. Kernels take tensors and ids only and import nothing of
the model, data or training engine. Modules (each imports triton, so none is imported here;
under ``TRITON_INTERPRET=1`` set the variable before importing them):

- ``patchify_gather``: K1, fused patchify + uint8 normalization + gather of the visible patches, and its backward;
- ``unshuffle_scatter``: K2, decoder input (unshuffle + mask token + positions) and its backward;
- ``masked_recon_loss``: K3, norm-pix MSE / L1 on the masked patches and its gradient;
- ``gather_queries``: CrossMAE decoder queries (mask token + positions of the patches to predict) and their gradients;
- ``_common``: helpers the kernel modules share (block sizes, input checks, image geometry, patch addressing).
"""
