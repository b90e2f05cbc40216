"""Attention backends agree with each other and with the formula; the choice is validated."""

from __future__ import annotations

import pytest
import torch

from fastmae.layers import Attention, attention_backend, set_attention_backend


@pytest.fixture(autouse=True)
def _restore():
    yield
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
        assert attention_backend() == "sdpa"
        with pytest.raises(ValueError, match="needs the flash-attn package and a CUDA GPU"):
            set_attention_backend("flash")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend("xformers")
