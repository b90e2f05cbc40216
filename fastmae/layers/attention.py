"""Multi-head self-attention with the kernel chosen per shape.

The user picks a policy once per process (``FASTMAE_ATTN``, or
:func:`set_attention_backend`):

- ``auto`` (default): the flash-attn packages where installed and suited to the
  shape, else ``torch.nn.functional.scaled_dot_product_attention`` with the
  kernel that fits the shape;
- ``sdpa``: SDPA only (kernel chosen per shape as in ``auto``);
- ``flash``: the flash-attn package wherever it supports the shape (needs it installed and a GPU);
- ``eager``: softmax(QK^T / sqrt(d)) V spelled out, for debugging.

Within the policy, :func:`choose_attention_backend` picks the kernel for one
(head_dim, seq_len, dtype, device) from the capabilities this process has
(:func:`attention_capabilities`, one check per backend). The dtype is the one
the kernel will see, i.e. ``qkv``'s: under autocast the block input is fp32
(LayerNorm output) while the qkv projection is bf16. MAE's decoder heads are
32-dim (512 / 16), which FlashAttention-3 does not cover, so encoder and
decoder can run different kernels; :func:`describe_attention` lists the choice
per shape for logs and reports.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_POLICIES = ("auto", "sdpa", "flash", "eager")
KERNELS = ("flash_attn_3", "flash_attn_2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa", "eager")
# FlashAttention-3 (Hopper) head dims; 32 (MAE's decoder) is not among them.
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)
# Below ~256 tokens FlashAttention-2 ties or loses to SDPA's kernels (DESIGN.md); MAE's 50/197 stay on SDPA.
FA2_MIN_SEQ = 256
_HALF = (torch.float16, torch.bfloat16)

_override: str | None = None
_resolved: str | None = None
_caps: AttnCaps | None = None
# {(head_dim, tokens): (kernel, fwd+bwd ms, batch)}: the measured fastest kernel per shape (set_attention_table)
_table: dict[tuple[int, int], tuple[str, float, int]] | None = None
TABLE_FORMAT = "fastmae-attention-table/1"


@dataclass(frozen=True)
class AttnCaps:
    """What this process can run; each field is one capability check."""

    cuda: bool = False
    sm: int = 0  # compute capability, major * 10 + minor
    flash_attn_3: bool = False  # `flash_attn_interface` (FA3, Hopper build) importable on sm_90
    flash_attn_2: bool = False  # `flash_attn` importable on sm_80+
    sdpa_cudnn: bool = False  # SDPBackend.CUDNN_ATTENTION exists and is enabled, sm_80+
    sdpa_flash: bool = False  # SDPA's FlashAttention-2 kernel, sm_80+
    sdpa_efficient: bool = False  # SDPA's memory-efficient kernel (any CUDA GPU, fp32 too)
    sdpa_priority: bool = False  # sdpa_kernel(..., set_priority=True) (torch >= 2.6)


def detect_capabilities() -> AttnCaps:
    """Probe the installed packages and the current GPU (no kernel runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    priority = "set_priority" in inspect.signature(sdpa_kernel).parameters
    if not torch.cuda.is_available():
        return AttnCaps(sdpa_priority=priority)
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    cuda_be = torch.backends.cuda
    return AttnCaps(
        cuda=True,
        sm=sm,
        flash_attn_3=sm == 90 and importlib.util.find_spec("flash_attn_interface") is not None,
        flash_attn_2=sm >= 80 and importlib.util.find_spec("flash_attn") is not None,
        sdpa_cudnn=sm >= 80 and hasattr(SDPBackend, "CUDNN_ATTENTION") and cuda_be.cudnn_sdp_enabled(),
        sdpa_flash=sm >= 80 and cuda_be.flash_sdp_enabled(),
        sdpa_efficient=cuda_be.mem_efficient_sdp_enabled(),
        sdpa_priority=priority,
    )


def attention_capabilities() -> AttnCaps:
    """The process's capabilities, probed once (tests replace them with :func:`set_attention_capabilities`)."""
    global _caps
    if _caps is None:
        _caps = detect_capabilities()
    return _caps


def set_attention_capabilities(caps: AttnCaps | None) -> None:
    """Pretend to have ``caps`` (None re-probes on next use). For tests and what-if plans."""
    global _caps
    _caps = caps


def choose_attention_backend(
    head_dim: int, seq_len: int, dtype: torch.dtype, device_type: str, caps: AttnCaps, policy: str = "auto",
    table: dict | None = None,
) -> str:
    """The kernel (one of ``KERNELS``) for one shape. Pure: the same inputs give the same answer.

    ``table`` (:func:`load_attention_table`): on CUDA with a half dtype, under ``auto``/``sdpa``, a measured shape
    runs its fastest kernel that this process can run and the policy allows; other shapes follow the rules."""
    if policy == "eager":
        return "eager"
    if device_type != "cuda":
        return "sdpa"  # CPU: torch picks its flash/math kernels
    half = dtype in _HALF
    measured = (table or {}).get((head_dim, seq_len))
    if measured and half and policy in ("auto", "sdpa") and _runnable(measured[0], caps, policy):
        return measured[0]
    aligned = head_dim % 8 == 0
    if policy in ("auto", "flash") and half:
        if caps.flash_attn_3 and head_dim in FA3_HEAD_DIMS:
            return "flash_attn_3"
        if caps.flash_attn_2 and aligned and head_dim <= 256 and (policy == "flash" or seq_len >= FA2_MIN_SEQ):
            return "flash_attn_2"
    if half and aligned and caps.sdpa_cudnn and caps.sm >= 90 and head_dim <= 128:
        return "sdpa_cudnn"
    if half and aligned and caps.sdpa_flash and head_dim <= 256:
        return "sdpa_flash"
    if caps.sdpa_efficient:
        return "sdpa_efficient"
    return "sdpa"


def _runnable(kernel: str, caps: AttnCaps, policy: str) -> bool:
    """Whether this process has ``kernel`` (a measured table may come from another machine)."""
    if kernel.startswith("flash_attn"):
        return policy == "auto" and getattr(caps, kernel)
    return kernel in ("sdpa", "eager") or getattr(caps, kernel, False)


def describe_attention(shapes: dict[str, tuple[int, int]], dtype: torch.dtype, device_type: str,
                       caps: AttnCaps | None = None, table: dict | None = None) -> dict[str, str]:
    """{name: kernel} for named (head_dim, seq_len) shapes, e.g. {"encoder": (64, 50), "decoder": (32, 197)};
    ``table`` defaults to the process's (:func:`set_attention_table`)."""
    caps = caps or attention_capabilities()
    table = _table if table is None else table
    return {name: choose_attention_backend(hd, t, dtype, device_type, caps, attention_backend(), table)
            for name, (hd, t) in shapes.items()}


def load_attention_table(path: str) -> dict[tuple[int, int], tuple[str, float, int]] | None:
    """The fastest kernel per (head_dim, tokens) of a timings JSON (``bench/gpu_report.py --attention_table``);
    ``""`` gives None. Any defect raises ValueError with a one-line reason naming the file."""
    if not path:
        return None
    import json

    try:
        doc = json.loads(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"attention_table {path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT or not isinstance(doc.get("shapes"), list):
        raise ValueError(f"attention_table {path}: not a {TABLE_FORMAT} file (needs 'format' and a 'shapes' list)")
    table = {}
    for i, entry in enumerate(doc["shapes"]):
        try:
            hd, t, batch, kernels = int(entry["head_dim"]), int(entry["tokens"]), int(entry["batch"]), entry["fwd_bwd_ms"]
            timed = {k: float(v) for k, v in kernels.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"attention_table {path}: shape {i} needs head_dim, tokens, batch and fwd_bwd_ms "
                             f"{{kernel: ms}} ({type(e).__name__}: {e})") from None
        bad = [k for k, v in timed.items() if k not in KERNELS or not v > 0 or v != v or v == float("inf")]
        if bad or not timed or min(hd, t, batch) < 1:
            raise ValueError(f"attention_table {path}: shape {i} has unknown kernels or non-positive values: "
                             f"{bad or 'no kernels'}; kernels are {', '.join(KERNELS)}")
        best = min(timed, key=timed.get)
        table[(hd, t)] = (best, timed[best], batch)
    return table


def set_attention_table(table: dict | None) -> None:
    """Make a measured table (:func:`load_attention_table`) the process's: every Attention module and
    :func:`describe_attention` consult it (None: the rules alone). Call before building or compiling models."""
    global _table
    _table = table


def attention_table(path: str = "") -> dict | None:
    """The table at ``path`` when given, else the process's."""
    return load_attention_table(path) if path else _table


def _resolve(requested: str) -> str:
    if requested not in _POLICIES:
        raise ValueError(f"attention backend must be one of {_POLICIES}, got {requested!r}")
    if requested == "flash":
        caps = attention_capabilities()
        if not (caps.flash_attn_2 or caps.flash_attn_3):
            raise ValueError("attention backend 'flash' needs the flash-attn package and a CUDA GPU (pip install '.[flash]')")
    if requested == "auto":
        return "auto"
    return requested


def attention_backend() -> str:
    """The policy every Attention module uses in this process (resolved on first use, then fixed)."""
    global _resolved
    if _resolved is None:
        _resolved = _resolve(_override or os.environ.get("FASTMAE_ATTN", "auto"))
    return _resolved


def set_attention_backend(name: str | None) -> None:
    """Override ``FASTMAE_ATTN`` (None restores it). Call before building or compiling models."""
    global _override, _resolved
    _resolved = _resolve(name or os.environ.get("FASTMAE_ATTN", "auto"))
    _override = name


def _sdpa_context(kernel: str, caps: AttnCaps):
    """Prefer one SDPA kernel; the efficient and math kernels stay allowed as torch's fallbacks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
    if kernel not in first:
        return nullcontext()
    order = [getattr(SDPBackend, first[kernel]), SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    order = list(dict.fromkeys(order))
    return sdpa_kernel(order, set_priority=True) if caps.sdpa_priority else sdpa_kernel(order)


def run_attention(qkv: Tensor, kernel: str, scale: float, caps: AttnCaps) -> Tensor:
    """softmax(QK^T * scale) V with the named kernel (one of ``KERNELS``). qkv: (B, T, 3, H, Dh) -> (B, T, H * Dh)"""
    B, T, _, H, Dh = qkv.shape
    if kernel == "flash_attn_3":
        from flash_attn_interface import flash_attn_func

        q, k, v = qkv.unbind(2)  # each (B, T, H, Dh)
        out = flash_attn_func(q, k, v, softmax_scale=scale)
        return (out[0] if isinstance(out, tuple) else out).reshape(B, T, H * Dh)
    if kernel == "flash_attn_2":
        from flash_attn import flash_attn_qkvpacked_func

        return flash_attn_qkvpacked_func(qkv, softmax_scale=scale).reshape(B, T, H * Dh)
    # Unbind the packed dim in place, then move heads: the same strided views as permuting first, but autograd's
    # backward stacks the three gradients straight into qkv's (B, T, 3, H, Dh) layout, one pass instead of a
    # stack into (3, B, H, T, Dh) and a permuted copy (issue 22, lever 6).
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, T, Dh)
    return dense_attention(q, k, v, kernel, scale, caps).transpose(1, 2).reshape(B, T, H * Dh)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str, scale: float, caps: AttnCaps) -> Tensor:
    """The ``eager`` and SDPA kernels (SDPA with the chosen kernel preferred), for self- and cross-attention.
    q: (B, H, Tq, Dh), k and v: (B, H, Tk, Dh) -> (B, H, Tq, Dh)"""
    if kernel == "eager":
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    with _sdpa_context(kernel, caps):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def check_heads(dim: int, num_heads: int, names: tuple[str, str] = ("dim", "num_heads")) -> None:
    """Heads split the width evenly: the one check of it, for the layers and for a run config's decoder keys."""
    if dim % num_heads:
        raise ValueError(f"{names[0]} {dim} is not divisible by {names[1]} {num_heads}")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        attention_backend()  # resolve (and validate) the process-wide policy before any forward is traced
        attention_capabilities()

    def _qkv(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, 3, H, Dh)"""
        B, T, _ = x.shape
        return self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D)"""
        qkv = self._qkv(x)  # the dtype the kernel sees: bf16 under autocast even when x is fp32
        caps = attention_capabilities()
        kernel = choose_attention_backend(self.head_dim, x.shape[1], qkv.dtype, qkv.device.type, caps, attention_backend(),
                                          _table)
        return self.proj(run_attention(qkv, kernel, self.scale, caps))

    def attention_probs(self, x: Tensor) -> Tensor:
        """Attention maps for diagnostics. x: (B, T, D) -> (B, H, T, T), rows sum to 1."""
        q, k, _ = self._qkv(x).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
