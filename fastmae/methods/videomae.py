"""VideoMAE (Tong et al. 2022) on fastmae's ops: tubelets, tube masking, asymmetric encoder-decoder.

One training forward (clip of T frames, tubelet t x p x p, T' = T / t slices, L_s = (H/p)(W/p)):
    noise (N, L_s) --argsort--> one spatial mask, repeated over the T' slices (tube masking)
    clip --pair frames (t, c) into t*C channels--> T' images per clip
         --patchify+gather (fused K1, the image op)--> visible tubelets (N, T'*L_vis, p*p*t*C)
         --patch_embed (Conv3d parameter as a GEMM) + fixed positions--> encoder --> (N, T'*L_vis, D)
         --decoder_embed; [visible | mask tokens] + decoder positions--> decoder
         --decoder_pred on the masked rows only--> pred (N, T'*L_mask, p*p*t*C)
         --MSE vs tubelet-normalized target (fused K3 for "tubelet"/"none")--> loss

Why the image ops serve video: tube masking keeps the same spatial ids in every slice, so a clip is
T' images whose channels are the t frames of a slice stacked as (t, c); the image patch order
(p, q, c) then becomes the tubelet order (p, q, t, c), and K1/K3 run unchanged on (N*T') images
with per-channel mean/std repeated t times. The only extra work is one layout copy of the clip.
Consequently the in-tubelet value order is (p, q, t, c) (official VideoMAE: (t, p, q, c)); the
patch-embedding parameter keeps the official Conv3d shape (D, C, t, p, p) and is permuted in the GEMM.

Target normalization (``target_norm``):
- "tubelet" (default): MAE's norm_pix over all t*p*p*C values of a tubelet, sqrt(unbiased var + 1e-6).
  The default because it is MAE's formula, so the fused K3 kernel computes it on the GPU.
- "channel": VideoMAE's variant, per tubelet and channel over t*p*p values, (x - mean) / (unbiased std + 1e-6)
  (eager). VideoMAE normalizes un-normalized [0, 1] pixels; per-channel normalization is invariant to
  that affine map up to the eps term, so the target is computed on the model's input.
- "none": raw (normalized-image) pixels.

Positions: VideoMAE's fixed 1-D sinusoid table over the (t, h, w) token sequence. There is no cls
token (VideoMAE pools by mean downstream). Names follow the official MAE style: ``patch_embed.proj``,
``pos_embed``, ``blocks.*``, ``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastmae import ops
from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.layers import Block, TubeletEmbed, init_weights, sinusoid_table
from fastmae.methods.registry import MethodConfig, MethodSpec, image_model_kwargs, register_method
from fastmae.models.masks import tube_mask
from fastmae.models.vit import LayerNorm6

TARGET_NORMS = ("tubelet", "channel", "none")


def pair_frames(videos: Tensor, tubelet_size: int) -> Tensor:
    """Clip -> T' images whose channels are the t frames of a slice, ordered (t, c).

    float (N, C, T, H, W) -> (N*T', t*C, H, W); uint8 (N, T, H, W, C) -> (N*T', H, W, t*C).
    """
    t = tubelet_size
    if videos.dtype == torch.uint8:
        N, T, H, W, C = videos.shape
        x = videos.reshape(N, T // t, t, H, W, C).permute(0, 1, 3, 4, 2, 5)
        return x.reshape(N * (T // t), H, W, t * C)
    N, C, T, H, W = videos.shape
    x = videos.reshape(N, C, T // t, t, H, W).permute(0, 2, 3, 1, 4, 5)
    return x.reshape(N * (T // t), t * C, H, W)


class VideoMAE(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        num_frames: int = 16,
        tubelet_size: int = 2,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        target_norm: str = "tubelet",
        drop_path_rate: float = 0.0,
        pixel_mean: tuple[float, ...] = IMAGENET_MEAN,
        pixel_std: tuple[float, ...] = IMAGENET_STD,
    ):
        super().__init__()
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
        if tubelet_size < 1 or num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not divisible by the tubelet size {tubelet_size}")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        if len(pixel_mean) != in_chans or len(pixel_std) != in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {in_chans} values")
        self.img_size, self.num_frames, self.tubelet_size, self.patch_size = img_size, num_frames, tubelet_size, patch_size
        self.in_chans, self.embed_dim, self.decoder_embed_dim = in_chans, embed_dim, decoder_embed_dim
        self.target_norm = target_norm
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.patch_embed = TubeletEmbed(in_chans, embed_dim, tubelet_size, patch_size)
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches, embed_dim).unsqueeze(0), requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=norm_layer) for i in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sinusoid_table(num_patches, decoder_embed_dim).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, tubelet_size * patch_size**2 * in_chans)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)
        self.apply(init_weights)
        with torch.no_grad():
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ---- input handling -------------------------------------------------------------------------------

    def check_videos(self, videos: Tensor) -> tuple[int, int, int, int]:
        """Validate a clip batch; float (N, C, T, H, W) or uint8 (N, T, H, W, C). Returns (N, T, H, W)."""
        if not isinstance(videos, Tensor):
            raise TypeError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
        if videos.ndim != 5:
            raise ValueError(
                f"videos must have 5 dims (N, C, T, H, W), or (N, T, H, W, C) for uint8; got shape {tuple(videos.shape)}"
            )
        if videos.dtype == torch.uint8:
            N, T, H, W, C = videos.shape
            layout = "(N, T, H, W, C) uint8"
        elif videos.is_floating_point():
            N, C, T, H, W = videos.shape
            layout = "(N, C, T, H, W) float"
        else:
            raise ValueError(f"videos must be float (N, C, T, H, W) or uint8 (N, T, H, W, C), got dtype {videos.dtype}")
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels in {layout} videos, got {C} (shape {tuple(videos.shape)})")
        if T % self.tubelet_size:
            raise ValueError(f"frame count {T} is not divisible by the tubelet size {self.tubelet_size}")
        if (T, H, W) != (self.num_frames, self.img_size, self.img_size):
            raise ValueError(
                f"clips must be {self.num_frames} frames of {self.img_size}x{self.img_size} for this model, "
                f"got {T} frames of {H}x{W}"
            )
        if N == 0:
            raise ValueError("empty batch")
        return N, T, H, W

    def _norm_args(self, videos: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if videos.dtype == torch.uint8:
            t = self.tubelet_size
            return self.pixel_mean.repeat(t), self.pixel_std.repeat(t)
        return None, None

    def _compute_dtype(self, videos: Tensor) -> torch.dtype:
        dev = videos.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.patch_embed.proj.weight.dtype

    def tubelet_mask(self, videos: Tensor, mask_ratio: float = 0.9, noise: Tensor | None = None):
        """-> (ids_keep_s, ids_masked_s, ids_keep, ids_masked, mask) of :func:`fastmae.models.masks.tube_mask`."""
        N, _, _, _ = self.check_videos(videos)
        Tp, gh, gw = self.grid_size
        Ls = gh * gw
        if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        len_keep = int(Ls * (1 - mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible tubelet out of {Ls} per time slice")
        if noise is not None and tuple(noise.shape) != (N, Ls):
            raise ValueError(f"noise must have shape (N, spatial tokens) = {(N, Ls)}, got {tuple(noise.shape)}")
        if noise is None:
            # The default generator keeps masks seeded by torch.manual_seed and capturable in CUDA graphs.
            noise = torch.rand(N, Ls, device=videos.device)
        return tube_mask(noise, Tp, len_keep)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward_encoder(self, frames: Tensor, ids_keep_s: Tensor, ids_keep: Tensor, dtype: torch.dtype, mean, std) -> Tensor:
        """frames: paired images (N*T', ...) -> visible tokens (N, T'*L_vis, D), normalized."""
        N = ids_keep.shape[0]
        Tp = frames.shape[0] // N
        ids = ids_keep_s.repeat_interleave(Tp, dim=0)
        patches = ops.patchify_gather(frames, ids, self.patch_size, mean, std, dtype)
        x = self.patch_embed(patches.reshape(N, -1, patches.shape[-1]))
        pos = torch.gather(self.pos_embed.expand(N, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: Tensor, ids_keep: Tensor, ids_masked: Tensor) -> Tensor:
        """x: (N, L_vis, D) -> pred (N, L_mask, p*p*t*C) for the masked tubelets, row j <-> ids_masked[:, j]."""
        N = x.shape[0]
        Dd = self.decoder_embed_dim
        x = self.decoder_embed(x)
        pos = self.decoder_pos_embed.expand(N, -1, -1)
        pos_vis = torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd))
        pos_mask = torch.gather(pos, 1, ids_masked.unsqueeze(-1).expand(-1, -1, Dd))
        x = torch.cat([x + pos_vis.to(x.dtype), (self.mask_token + pos_mask).to(x.dtype)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x[:, -ids_masked.shape[1]:, :]))

    def forward_loss(self, frames: Tensor, pred: Tensor, ids_masked_s: Tensor, mean, std) -> Tensor:
        """frames: paired images (N*T', ...); pred: (N, T'*L_mask, P); ids_masked_s: (N, L_mask) spatial ids."""
        N, Lm = ids_masked_s.shape
        Tp = frames.shape[0] // N
        ids = ids_masked_s.repeat_interleave(Tp, dim=0)
        pred = pred.reshape(N * Tp, Lm, pred.shape[-1])
        if self.target_norm == "channel":
            return self._channel_norm_loss(frames, pred, ids, mean, std)
        return ops.masked_recon_loss(pred, frames, ids, self.patch_size, self.target_norm == "tubelet", "mse", mean, std)

    def _channel_norm_loss(self, frames: Tensor, pred: Tensor, ids: Tensor, mean, std, eps: float = 1e-6) -> Tensor:
        target = ops.patchify_gather(frames, ids, self.patch_size, mean, std, torch.float32)
        t = target.reshape(*target.shape[:2], -1, self.in_chans)
        t = (t - t.mean(dim=-2, keepdim=True)) / (t.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
        err = pred.float() - t.reshape(target.shape)
        return (err * err).mean()

    def forward(self, videos: Tensor, mask_ratio: float = 0.9, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """videos: (N, C, T, H, W) normalized float, or (N, T, H, W, C) uint8; noise: (N, L_s) or None.

        Returns loss (fp32 scalar), pred (N, T'*L_mask, p*p*t*C) for the masked tubelets (row j <-> the
        j-th masked token in (t, h, w) order: slice-major, spatial ids of the tube mask), mask (N, T'*L_s), 1 = masked.
        """
        ids_keep_s, ids_masked_s, ids_keep, ids_masked, mask = self.tubelet_mask(videos, mask_ratio, noise)
        mean, std = self._norm_args(videos)
        frames = pair_frames(videos, self.tubelet_size)
        latent = self.forward_encoder(frames, ids_keep_s, ids_keep, self._compute_dtype(videos), mean, std)
        pred = self.forward_decoder(latent, ids_keep, ids_masked)
        loss = self.forward_loss(frames, pred, ids_masked_s, mean, std)
        return loss, pred, mask


def videomae_vit_tiny(**kw) -> VideoMAE:
    """CPU-sized: 16 frames of 64 px, tubelets 2x8x8, width 192 depth 4, decoder 128 x 2."""
    arch = dict(img_size=64, num_frames=16, tubelet_size=2, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
    return VideoMAE(**{**arch, **kw})


def videomae_vit_base_patch16(**kw) -> VideoMAE:
    """VideoMAE ViT-B: 16 frames of 224 px, tubelets 2x16x16, decoder 384 x 4 (6 heads)."""
    arch = dict(img_size=224, num_frames=16, tubelet_size=2, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6)
    return VideoMAE(**{**arch, **kw})


VIDEOMAE_MODELS: dict[str, Callable[..., VideoMAE]] = {
    "videomae_vit_tiny": videomae_vit_tiny,
    "videomae_vit_base_patch16": videomae_vit_base_patch16,
}


# VideoMAE paper (ViT-B, K400, 800 epochs): AdamW, blr 1.5e-4 per 256, warmup 40, wd 0.05, betas
# (0.9, 0.95), 16 frames stride 4, tube mask 0.9, batch 32 per GPU x 64 GPUs.
PRESETS: dict[str, dict] = {
    "videomae_vit_base": dict(
        method="videomae", model="videomae_vit_base_patch16", img_size=224, patch_size=16, mask_ratio=0.9,
        norm_pix_loss=True, epochs=800, warmup_epochs=40.0, batch_size=32, accum_iter=1, blr=1.5e-4,
        weight_decay=0.05, beta1=0.9, beta2=0.95, loader="dali", num_workers=10, log_every=50, ckpt_every=1000,
        compile=True,
    ),
    # CPU-sized: the embedded clip demo (24 VP9 clips of 64 frames, 16 x stride 4 sampled) in a few minutes.
    "videomae_tiny": dict(
        method="videomae", model="videomae_vit_tiny", img_size=64, patch_size=8, mask_ratio=0.9, norm_pix_loss=True,
        epochs=40, warmup_epochs=4.0, batch_size=8, blr=1e-2, num_workers=0, log_every=6, ckpt_every=60,
    ),
}


@dataclass
class VideoMAEConfig(MethodConfig):
    num_frames: int = field(default=16, metadata={"help": "VideoMAE clip length in frames"})
    frame_stride: int = field(default=4, metadata={"help": "VideoMAE frame sampling stride"})
    tubelet_size: int = field(default=0, metadata={"help": "VideoMAE tubelet depth in frames; 0 = the model's (2)"})
    video_target_norm: str = field(default="", metadata={"help": "VideoMAE target: '' (tubelet if norm_pix_loss) | "
                                                                  "tubelet | channel | none"})

    def validate(self, cfg) -> None:
        if self.tubelet_size < 0:
            raise ValueError(f"tubelet_size must be >= 0, got {self.tubelet_size}")
        if self.num_frames <= 0 or self.frame_stride <= 0:
            raise ValueError("num_frames and frame_stride must be positive")
        if self.video_target_norm not in ("", "tubelet", "channel", "none"):
            raise ValueError(f"video_target_norm must be tubelet, channel or none, got {self.video_target_norm!r}")


def model_kwargs(cfg) -> dict:
    """``tubelet_size`` 0 keeps the model's; ``video_target_norm`` "" follows ``norm_pix_loss`` ("tubelet" or "none")."""
    m = cfg.method
    kw = {**image_model_kwargs(cfg), "num_frames": m.num_frames}
    if m.tubelet_size:
        kw["tubelet_size"] = m.tubelet_size
    kw["target_norm"] = m.video_target_norm or ("tubelet" if cfg.model.norm_pix_loss else "none")
    return kw


def noise_shape(model: VideoMAE, batch: Tensor) -> tuple[int, int]:
    """One noise value per spatial position (the tube mask repeats it over time): (N, L_s)."""
    return batch.shape[0], model.grid_size[1] * model.grid_size[2]


def clip_loader(cfg, rank: int, world_size: int, device, split: str, output: str):
    """Clips (float (N, C, T, H, W) normalized, or uint8 (N, T, H, W, C)) of a run config."""
    from fastmae.data import build_video_loader

    m = cfg.method
    tubelet = m.tubelet_size or 2
    if m.num_frames % tubelet:
        raise ValueError(f"num_frames {m.num_frames} is not divisible by the tubelet size {tubelet}")
    train = split == "train"
    return build_video_loader(
        cfg.data.path, split=split, batch_size=cfg.optim.batch_size, img_size=cfg.data.img_size, num_frames=m.num_frames,
        frame_stride=m.frame_stride, loader=cfg.data.loader, output=output, train=train,
        num_workers=cfg.data.num_workers, seed=cfg.seed, rank=rank, world_size=world_size, device=str(device), drop_last=train,
    )


register_method(MethodSpec(
    name="videomae", models=VIDEOMAE_MODELS, model_kwargs=model_kwargs, noise_shape=noise_shape, presets=PRESETS,
    default_preset="videomae_tiny", size_siblings_of=("mae_",), build_loader=clip_loader, unit="clips",
    config=VideoMAEConfig,
))
