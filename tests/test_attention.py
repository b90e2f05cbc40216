"""Attention backends agree with each other and with the formula; the per-shape kernel choice is validated."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastmae.layers import Attention, attention_backend, set_attention_backend
from fastmae.layers import attention as attn_mod
from fastmae.layers.attention import AttnCaps, choose_attention_backend, describe_attention, set_attention_capabilities


@pytest.fixture(autouse=True)
def _restore():
    yield
    set_attention_capabilities(None)
    set_attention_backend(None)


def test_sdpa_and_eager_match_the_formula():
    torch.manual_seed(0)
    attn = Attention(48, 3)
    x = torch.randn(2, 7, 48)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 16).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, dim=-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 7, 48))
    outs = {}
    for name in ("sdpa", "eager"):
        set_attention_backend(name)
        assert attention_backend() == name
        outs[name] = attn(x)
        torch.testing.assert_close(outs[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.attention_probs(x), probs, rtol=1e-5, atol=1e-6)


def test_auto_is_sdpa_without_flash_attn_and_bad_names_fail(monkeypatch):
    set_attention_backend(None)
    monkeypatch.setenv("FASTMAE_ATTN", "auto")
    if not torch.cuda.is_available():
        assert attention_backend() == "auto"
        assert set(describe_attention({"enc": (64, 50), "dec": (32, 197)}, torch.bfloat16, "cpu").values()) == {"sdpa"}
        with pytest.raises(ValueError, match="needs the flash-attn package and a CUDA GPU"):
            set_attention_backend("flash")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend("xformers")


# ---- per-shape choice with fake capabilities -------------------------------------------------------------------

H100_FA3 = AttnCaps(cuda=True, sm=90, flash_attn_3=True, flash_attn_2=True, sdpa_cudnn=True, sdpa_flash=True,
                    sdpa_efficient=True, sdpa_priority=True)
A100_FA2 = AttnCaps(cuda=True, sm=80, flash_attn_2=True, sdpa_cudnn=True, sdpa_flash=True, sdpa_efficient=True,
                    sdpa_priority=True)
A100_BARE = AttnCaps(cuda=True, sm=80, sdpa_flash=True, sdpa_efficient=True, sdpa_priority=True)
V100 = AttnCaps(cuda=True, sm=70, sdpa_efficient=True)

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "caps,head_dim,seq_len,dtype,device,policy,expected",
    [
        # ViT-B encoder (64-dim heads, 50 tokens) and decoder (32-dim heads, 197 tokens) on an H100 with FA3.
        (H100_FA3, 64, 50, BF16, "cuda", "auto", "flash_attn_3"),
        (H100_FA3, 32, 197, BF16, "cuda", "auto", "sdpa_cudnn"),  # FA3 has no 32-dim heads
        (H100_FA3, 64, 50, FP32, "cuda", "auto", "sdpa_efficient"),  # flash kernels are fp16/bf16 only
        (H100_FA3, 64, 50, BF16, "cuda", "sdpa", "sdpa_cudnn"),
        (H100_FA3, 64, 50, BF16, "cuda", "eager", "eager"),
        # A100 with flash-attn 2: SDPA below FA2_MIN_SEQ tokens, FA2 above, FA2 whenever asked for.
        (A100_FA2, 32, 197, BF16, "cuda", "auto", "sdpa_flash"),
        (A100_FA2, 80, 257, BF16, "cuda", "auto", "flash_attn_2"),
        (A100_FA2, 32, 197, BF16, "cuda", "flash", "flash_attn_2"),
        (A100_FA2, 36, 197, BF16, "cuda", "flash", "sdpa_efficient"),  # head dim not a multiple of 8
        (A100_BARE, 64, 50, BF16, "cuda", "auto", "sdpa_flash"),
        (V100, 64, 50, torch.float16, "cuda", "auto", "sdpa_efficient"),
        (AttnCaps(), 64, 50, BF16, "cuda", "auto", "sdpa"),
        (H100_FA3, 64, 50, BF16, "cpu", "auto", "sdpa"),
    ],
)
def test_kernel_choice_per_shape(caps, head_dim, seq_len, dtype, device, policy, expected):
    assert choose_attention_backend(head_dim, seq_len, dtype, device, caps, policy) == expected


def test_describe_attention_lists_encoder_and_decoder_kernels():
    set_attention_capabilities(H100_FA3)
    set_attention_backend("auto")
    got = describe_attention({"encoder": (64, 50), "decoder": (32, 197)}, BF16, "cuda")
    assert got == {"encoder": "flash_attn_3", "decoder": "sdpa_cudnn"}


def test_chooser_sees_the_autocast_dtype_not_the_block_input(monkeypatch):
    # Under autocast the block input (LayerNorm output) is fp32 and only qkv is bf16: the flash path must see bf16.
    seen = []
    real = attn_mod.choose_attention_backend

    def spy(head_dim, seq_len, dtype, device_type, caps, policy="auto", table=None):
        seen.append(dtype)
        return real(head_dim, seq_len, dtype, device_type, caps, policy, table)

    monkeypatch.setattr(attn_mod, "choose_attention_backend", spy)
    attn = Attention(64, 2)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln = torch.nn.functional.layer_norm(x, (64,))
        assert ln.dtype == torch.float32
        attn(ln)
    assert seen == [torch.bfloat16]


def test_flash_attn_2_is_called_with_packed_bf16_qkv_on_cuda(monkeypatch):
    """FakeTensorMode CUDA tensors + a stand-in flash_attn module: the forward reaches the packed kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    def fake_packed(qkv, softmax_scale=None):
        calls.append((tuple(qkv.shape), qkv.dtype, qkv.device.type, softmax_scale))
        return torch.empty_like(qkv[:, :, 0])

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_qkvpacked_func=fake_packed))
    set_attention_capabilities(A100_FA2)
    set_attention_backend("flash")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
            attn = Attention(64, 2)  # built on the fake device in bf16: .to() cannot swap fake parameters
            out = attn(torch.randn(3, 7, 64))
    finally:
        torch.set_default_dtype(torch.float32)
    assert calls == [((3, 7, 3, 2, 32), torch.bfloat16, "cuda", 32**-0.5)]
    assert tuple(out.shape) == (3, 7, 64)


@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
def test_pinned_sdpa_kernels_trace_fullgraph_and_match(monkeypatch, kernel):
    # The per-shape SDPA preference is a context manager inside forward: Dynamo must trace it without a graph break.
    # On CPU only the math kernel can serve, which the preference list keeps as the fallback.
    monkeypatch.setattr(attn_mod, "choose_attention_backend", lambda *a, **k: kernel)
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, 9, 64)
    set_attention_backend("sdpa")
    expected = attn(x)
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
