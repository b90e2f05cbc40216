"""CrossMAE (Fu et al., TMLR 2025) as a registered method: cross-attention decoder, partial reconstruction.

The models are :mod:`fastmae.models.crossmae`'s. Its keys (:class:`CrossMAEConfig`): MAE's ``mask_type`` and
decoder shape, plus ``prediction_ratio`` (0 = the model's, 0.25) and ``feature_fusion`` (none = the model's, on).
``loss_on`` and ``encoder_mask_tokens`` are MAE-only ablations: as flags they are refused at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fastmae.methods.mae import OFFICIAL_RECIPE, MaskDecoderConfig, noise_shape, visualize
from fastmae.methods.registry import MethodSpec, image_model_kwargs, register_method
from fastmae.models.crossmae import CROSSMAE_MODELS

PRESETS: dict[str, dict] = {
    # CPU-sized: MAE-tiny's recipe and shapes on the embedded demo.
    "crossmae_tiny": dict(method="crossmae", model="crossmae_vit_tiny", img_size=64, patch_size=8, epochs=100,
                          warmup_epochs=5.0, batch_size=32, blr=1.5e-3, log_every=10, ckpt_every=100),
    # The paper's ViT-B recipe (decoder 512 x 12, prediction ratio 0.25, inter-block feature maps) on MAE's schedule.
    "crossmae_vit_base_patch16": dict(method="crossmae", model="crossmae_vit_base_patch16", **OFFICIAL_RECIPE),
}


@dataclass
class CrossMAEConfig(MaskDecoderConfig):
    prediction_ratio: float = field(default=0.0, metadata={"help": "fraction of all patches decoded in training (a "
                                                                   "random subset of the masked); 0 = the model's (0.25)"})
    feature_fusion: bool | None = field(default=None, metadata={"help": "inter-block feature maps: true | false; none "
                                                                        "= the model's (on)"})

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if not 0.0 <= self.prediction_ratio <= 1.0:
            raise ValueError(f"prediction_ratio must be in [0, 1] (0 = the model's), got {self.prediction_ratio}")


def model_kwargs(cfg) -> dict:
    m = cfg.method
    kw = {**image_model_kwargs(cfg), "norm_pix_loss": cfg.model.norm_pix_loss, "mask_type": m.mask_type,
          "residual_dtype": cfg.step.residual_dtype, "decoder_input_dtype": cfg.step.decoder_input_dtype,
          **m.decoder_kwargs()}
    if m.prediction_ratio:
        kw["prediction_ratio"] = m.prediction_ratio
    if m.feature_fusion is not None:
        kw["feature_fusion"] = m.feature_fusion
    return kw


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def forward_flops(model: nn.Module, img_size: int, mask_ratio: float, prediction_ratio: float | None = None) -> float:
    """Forward FLOPs per image (matmuls and attention; 1 multiply-add = 2 FLOPs) at the training prediction ratio."""
    p = model.patch_size
    L = (img_size // p) ** 2
    vis = int(L * (1 - mask_ratio))
    ratio = model.prediction_ratio if prediction_ratio is None else prediction_ratio
    T = min(L - vis, int(L * ratio))
    M = 1 + vis
    P = p * p * model.in_chans
    D, Dd = model.embed_dim, model.decoder_embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    f = _linear(vis, P, D)
    f += len(model.blocks) * (_linear(M, D, 3 * D) + _linear(M, D, D) + 2 * _linear(M, D, hidden) + 2 * 2 * M * M * D)
    n_dec = len(model.decoder_blocks)
    if model.decoder_fusion is not None:
        f += n_dec * (2 * M * D * (len(model.blocks) + 1) + _linear(M, D, Dd))
    else:
        f += _linear(M, D, Dd)
    d_hidden = model.decoder_blocks[0].mlp.fc1.out_features
    f += n_dec * (_linear(T, Dd, Dd) + _linear(M, Dd, 2 * Dd) + _linear(T, Dd, Dd) + 2 * _linear(T, Dd, d_hidden)
                  + 2 * 2 * T * M * Dd)
    f += _linear(T, Dd, P)
    return float(f)


def flops_per_image(model: nn.Module, cfg) -> float:
    """Training FLOPs per image: forward + backward = 3 forwards."""
    return 3 * forward_flops(model, cfg.data.img_size, cfg.model.mask_ratio)


register_method(MethodSpec(
    name="crossmae", models=CROSSMAE_MODELS, model_kwargs=model_kwargs, noise_shape=noise_shape,
    presets=PRESETS, default_preset="crossmae_tiny", size_siblings_of=("mae_",), flops_per_image=flops_per_image,
    visualize=visualize, config=CrossMAEConfig,
))
