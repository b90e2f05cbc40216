"""``fastmae finetune-video``: VideoMAE fine-tuning on clip folders, clip-level top-1 with multi-view testing.

Data: ``ROOT/train/<class>/*.webm|mkv|avi|mp4`` and ``ROOT/val/<class>/*`` (``--data=demo``: the
embedded VP9 clips of photos panning and zooming, one class per photo). Training clips stream
through :func:`fastmae.data.build_video_loader` (random temporal start, random-resized crop,
flip; sharded by rank, resumable). Validation scores every clip once across ranks from
``num_clips`` temporal windows (evenly spaced) x ``num_crops`` square crops (1: center; 3:
start / center / end of the long side, as VideoMAE's and SlowFast's 3-crop testing), averaging the
softmax over the views.

Model: VideoMAE's encoder on every tubelet (no masking), mean pooling, ``fc_norm`` and a linear
head (VideoMAE's fine-tuning model), from a ``fastmae pretrain --method=videomae`` checkpoint or
random init; the loop, optimizer (AdamW, layer-wise lr decay), schedule, checkpoints, resume and
distributed evaluation are the image protocols' (:func:`fastmae.eval.protocol.train_classifier`).

Example:
    fastmae pretrain --preset=videomae_tiny --output_dir=runs/videomae-tiny
    fastmae finetune-video --ckpt=runs/videomae-tiny --data=demo --epochs=5
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastmae import ops
from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.engine.step import resolve_precision
from fastmae.eval.config import VideoFinetuneConfig, stored_flat
from fastmae.eval.protocol import EvalData, format_result, run_in_folder, train_classifier
from fastmae.flags import run_cli
from fastmae.methods.videomae import VIDEOMAE_MODELS, VideoMAE, pair_frames

PRESETS: dict[str, dict] = {"demo": {}}


class VideoClassifier(nn.Module):
    """VideoMAE encoder (all tubelets) -> mean pool -> fc_norm -> head. Names: patch_embed, pos_embed, blocks, fc_norm, head."""

    def __init__(self, mae: VideoMAE, num_classes: int):
        super().__init__()
        self.patch_embed, self.pos_embed, self.blocks = mae.patch_embed, mae.pos_embed, mae.blocks
        self.tubelet_size, self.patch_size, self.grid_size = mae.tubelet_size, mae.patch_size, mae.grid_size
        self.check_videos = mae.check_videos
        self.fc_norm = nn.LayerNorm(mae.embed_dim, eps=1e-6)
        self.head = nn.Linear(mae.embed_dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def forward(self, videos: Tensor) -> Tensor:
        """videos: normalized float (N, C, T, H, W) -> logits (N, num_classes)."""
        N = self.check_videos(videos)[0]
        Tp, gh, gw = self.grid_size
        frames = pair_frames(videos, self.tubelet_size)  # (N * T', t * C, H, W)
        ids = torch.arange(gh * gw, device=videos.device).expand(N * Tp, -1)
        dtype = torch.get_autocast_dtype(videos.device.type) if torch.is_autocast_enabled(videos.device.type) else (
            self.patch_embed.proj.weight.dtype)
        patches = ops.patchify_gather(frames, ids, self.patch_size, None, None, dtype)
        x = self.patch_embed(patches.reshape(N, Tp * gh * gw, -1)) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.fc_norm(x.mean(dim=1)))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay: embeddings, each block, then fc_norm and head."""
        return dict(stem=r"^pos_embed|patch_embed", blocks=r"^blocks\.(\d+)", head=r"^fc_norm|^head")


class MultiView(nn.Module):
    """(N * V, ...) views -> (N, K) log of the view-averaged softmax: what :func:`evaluate` scores per clip."""

    def __init__(self, model: nn.Module, views: int):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, x: Tensor) -> Tensor:
        p = self.model(x).float().softmax(dim=-1)
        return p.unflatten(0, (-1, self.views)).mean(dim=1).clamp_min(1e-12).log()


def view_windows(item, span: int, num_clips: int, num_crops: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(start frame, square crop window (left, top, side, side)) of every test view of a clip."""
    last = item.num_frames - span
    starts = [last // 2] if num_clips == 1 else [round(k * last / (num_clips - 1)) for k in range(num_clips)]
    side = min(item.width, item.height)
    free_x, free_y = item.width - side, item.height - side
    offsets = [0.5] if num_crops == 1 else [0.0, 0.5, 1.0]
    crops = [(round(o * free_x), round(o * free_y), side, side) for o in offsets]
    return [(s, c) for s in starts for c in crops]


class MultiViewClips:
    """Validation batches ``(views (B * V, 3, T, S, S) normalized, labels (B,))``; this rank's share of the clips,
    the wrap-around padding labelled -1 (every clip scored once across ranks)."""

    def __init__(self, items, *, img_size: int, num_frames: int, frame_stride: int, num_clips: int, num_crops: int,
                 batch_size: int, rank: int, world_size: int, device: torch.device):
        from fastmae.data.loader import rank_indices, rank_valid_count

        self.items, self.img_size, self.frame_stride, self.device = items, img_size, frame_stride, device
        self.num_frames, self.num_clips, self.num_crops, self.batch_size = num_frames, num_clips, num_crops, batch_size
        self.span = (num_frames - 1) * frame_stride + 1
        self.num_samples = len(items)
        kw = dict(rank=rank, world_size=world_size, batch_size=batch_size, drop_last=False)
        self.mine = rank_indices(len(items), epoch=0, seed=0, shuffle=False, **kw)
        self.valid = rank_valid_count(len(items), **kw)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)

    def views(self, item) -> Tensor:
        from fastmae.data.video import crop_resize, decode_pyav

        out, decoded = [], {}
        for start, window in view_windows(item, self.span, self.num_clips, self.num_crops):
            if start not in decoded:  # the crops of one temporal clip share its decoded frames
                decoded = {start: decode_pyav(item.path, list(range(start, start + self.span, self.frame_stride)))}
            clip = crop_resize(decoded[start], window, False, self.img_size)  # uint8 (T, S, S, 3)
            out.append((clip.permute(3, 0, 1, 2).float() / 255 - self.mean) / self.std)
        return torch.stack(out)

    def __iter__(self):
        for b in range(0, len(self.mine), self.batch_size):
            idx = self.mine[b : b + self.batch_size]
            labels = torch.tensor([self.items[i].label if b + k < self.valid else -1 for k, i in enumerate(idx)])
            clips = torch.cat([self.views(self.items[i]) for i in idx])
            yield clips.to(self.device), labels.to(self.device)


def build_video_classifier(cfg: VideoFinetuneConfig, sd: dict | None, meta: dict,
                           num_classes: int) -> tuple[VideoClassifier, dict]:
    recorded = stored_flat(meta.get("config"), VideoFinetuneConfig)  # a pretraining's (flat) or an earlier fine-tuning's
    name = recorded.get("model") or cfg.model.name
    if name not in VIDEOMAE_MODELS:
        raise ValueError(f"unknown VideoMAE model {name!r}; choose one of {sorted(VIDEOMAE_MODELS)}")
    kw = {k: v for k, v in (("img_size", cfg.model.img_size or recorded.get("img_size")),
                            ("patch_size", cfg.model.patch_size or recorded.get("patch_size")),
                            ("tubelet_size", recorded.get("tubelet_size"))) if v}
    mae = VIDEOMAE_MODELS[name](num_frames=cfg.protocol.num_frames, drop_path_rate=cfg.model.drop_path, **kw)
    if sd is not None:
        from fastmae.convert import load_into

        load_into(mae, sd, strict=True)
    arch = dict(model=name, img_size=mae.img_size, patch_size=mae.patch_size, num_frames=mae.num_frames,
                tubelet_size=mae.tubelet_size, embed_dim=mae.embed_dim, depth=len(mae.blocks))
    return VideoClassifier(mae, num_classes), arch


def run_video_finetune(cfg: VideoFinetuneConfig) -> dict:
    return run_in_folder(cfg, lambda info, run_dir, write, preemption: _train_video(
        cfg, info, run_dir, write, preemption))


def _train_video(cfg: VideoFinetuneConfig, info, run_dir: Path | None, write: bool, preemption) -> dict:
    from fastmae.data import build_video_loader
    from fastmae.data.video import scan_videos
    from fastmae.eval.models import read_source

    torch.manual_seed(cfg.seed)
    sd, meta = read_source(cfg.model.ckpt)
    recorded = stored_flat(meta.get("config"), VideoFinetuneConfig)
    img_size = cfg.model.img_size or int(recorded.get("img_size") or 0) or VIDEOMAE_MODELS[cfg.model.name](depth=1).img_size
    common = dict(img_size=img_size, num_frames=cfg.protocol.num_frames, frame_stride=cfg.protocol.frame_stride,
                  loader=cfg.data.loader, num_workers=cfg.data.num_workers, seed=cfg.seed, rank=info.rank,
                  world_size=info.world_size, device=str(info.device))
    train = build_video_loader(cfg.data.path, split="train", batch_size=cfg.optim.batch_size, train=True, **common)
    if cfg.data.path == "demo":
        from fastmae.data import demo_cache_dir
        from fastmae.data.video_demo import prepare_video_demo

        val_root = prepare_video_demo(demo_cache_dir()) / "val"  # built once, as the train loader did
    else:
        val_root = Path(cfg.data.path) / "val"
    if not val_root.is_dir():
        raise ValueError(f"clip data {cfg.data.path} needs a val/ split of class folders ({val_root} not found)")
    items, _, val_classes = scan_videos(val_root, (cfg.protocol.num_frames - 1) * cfg.protocol.frame_stride + 1, "torch")
    if val_classes != train.classes:
        raise ValueError(f"train and val class folders differ: {train.classes[:5]} vs {val_classes[:5]}")
    p = cfg.protocol
    val = MultiViewClips(items, img_size=img_size, num_frames=p.num_frames, frame_stride=p.frame_stride,
                         num_clips=p.num_clips, num_crops=p.num_crops, batch_size=cfg.optim.eval_batch_size,
                         rank=info.rank, world_size=info.world_size, device=info.device)
    model, arch = build_video_classifier(cfg, sd, meta, len(train.classes))
    model.to(info.device)
    views = cfg.protocol.num_clips * cfg.protocol.num_crops
    data = EvalData(train, val, None, len(train.classes), list(train.classes), IMAGENET_MEAN, IMAGENET_STD,
                    len(items), f"clips ({cfg.protocol.num_clips} clips x {cfg.protocol.num_crops} crops at test)",
                    score=lambda m: MultiView(m, views))
    summary = train_classifier(cfg, info, model, data, resolve_precision(cfg.step.precision, info.device, cpu_auto="fp32"),
                               run_dir, write, arch, -1, preemption)
    summary.update(source=cfg.model.ckpt, arch=arch, data=data.kind, chance=1.0 / data.num_classes, rank=info.rank,
                   views=views)
    return summary


def _body(cfg: VideoFinetuneConfig) -> int:
    r = run_video_finetune(cfg)
    if r.get("status") != "preempted" and r["rank"] == 0:
        print(format_result(r, cfg.output_dir) + f" (clip-level, {r['views']} views averaged)")
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, VideoFinetuneConfig, PRESETS, _body, "finetune-video", __doc__)

