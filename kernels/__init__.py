"""Triton kernels of fastmae, installed as ``fastmae.kernels``.

Kernels take tensors and ids only: they import nothing of the model, data or
training engine.
"""
