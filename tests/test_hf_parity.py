"""fastmae's MAE against transformers' ViTMAEForPreTraining: same weights, same noise, fp32."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastmae import mae_vit_tiny  # noqa: E402
from fastmae.convert import from_hf_vitmae, hf_config_kwargs, to_hf_vitmae  # noqa: E402


def _pair(norm_pix: bool, **kw):
    torch.manual_seed(0)
    ours = mae_vit_tiny(norm_pix_loss=norm_pix, **kw)
    cfg = transformers.ViTMAEConfig(**hf_config_kwargs(ours))
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    hf.load_state_dict(to_hf_vitmae(ours.state_dict()), strict=True)
    return ours, hf


@pytest.mark.parametrize(
    "norm_pix,kw,ratio",
    [
        (True, dict(img_size=32, patch_size=4), 0.75),
        (False, dict(img_size=32, patch_size=4), 0.5),
        # 224/16 structure scaled in width: 196 patches, D=96 (not a power of two), C=3
        (True, dict(img_size=224, patch_size=16, embed_dim=96, num_heads=3, decoder_embed_dim=64, decoder_num_heads=2), 0.9),
    ],
)
def test_loss_pred_mask_and_grads_match_hf(norm_pix, kw, ratio):
    ours, hf = _pair(norm_pix, **kw)
    hf.config.mask_ratio = ratio
    img = kw["img_size"]
    L = (img // kw["patch_size"]) ** 2
    torch.manual_seed(1)
    x = torch.randn(2, 3, img, img)
    noise = torch.rand(2, L)

    loss, pred, mask = ours(x, mask_ratio=ratio, noise=noise)
    out = hf(pixel_values=x, noise=noise)
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, out.mask)

    loss.backward()
    out.loss.backward()
    hf_grads = from_hf_vitmae({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked == sum(p.requires_grad for p in ours.parameters()) > 20


def test_converter_round_trip_and_hf_names():
    ours, hf = _pair(True, img_size=32, patch_size=4)
    sd = ours.state_dict()
    back = from_hf_vitmae(to_hf_vitmae(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # The converter's output is exactly the installed transformers' key set.
    assert set(to_hf_vitmae(sd)) == set(hf.state_dict())


def test_from_hf_reads_transformers4_names():
    ours, _ = _pair(True, img_size=32, patch_size=4)
    v5 = to_hf_vitmae(ours.state_dict())
    v4 = {}
    for k, v in v5.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for a, b in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"),
                     ("o_proj", "output.dense")):
            k = k.replace(f"attention.{a}", f"attention.{b}")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        v4[k] = v
    back = from_hf_vitmae(v4)
    assert set(back) == set(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
