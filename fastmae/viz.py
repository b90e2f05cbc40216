"""Reconstruction grids and training curves.

Columns of a grid: original | masked | reconstruction | reconstruction + visible | prediction only.
With norm-pix loss the model predicts each patch normalized by its own mean and std, so the
"reconstruction" columns map predictions back with each patch's *ground-truth* mean and std: the
colours and brightness of every masked patch come from the original image (even a random model shows
the right colours there). The "prediction only" column uses no ground truth: the raw normalized
predictions, shown in the image normalization, i.e. the structure the model itself predicts. Every
grid says so in its caption and in a JSON file beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from fastmae.reference import patchify, unpatchify

COLUMNS = {
    "original": "original",
    "masked": "masked",
    "reconstruction": "reconstruction",
    "pasted": "recon + visible",
    "prediction": "prediction only",
}
NORM_PIX_NOTE = ("masked patches are de-normalized with each patch's ground-truth mean/std (norm-pix loss), so even a "
                 "random model shows the right colours; 'prediction only' uses no ground truth")
PIXEL_NOTE = "the model predicts pixels directly (no norm-pix): reconstruction and prediction use no ground truth"


@torch.no_grad()
def reconstruct(model, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None) -> dict[str, Tensor]:
    """imgs: normalized float (N, C, H, W) -> dict of (N, C, H, W) panels in the same normalized space.

    Keys: the :data:`COLUMNS` plus ``mask`` (1 = removed, per pixel).
    """
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    pred = pred.float()
    raw = pred
    norm_pix = bool(getattr(model, "norm_pix_loss", False))  # SimMIM predicts the normalized image itself
    if norm_pix:
        target = patchify(imgs.float(), p)
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    rec = unpatchify(pred, p, model.in_chans, grid)
    m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * model.in_chans), p, model.in_chans, grid)
    return {"original": imgs.float(), "masked": imgs.float() * (1 - m), "reconstruction": rec,
            "pasted": imgs.float() * (1 - m) + rec * m, "prediction": unpatchify(raw, p, model.in_chans, grid), "mask": m,
            "norm_pix": torch.tensor(norm_pix)}


def to_uint8(x: Tensor, mean, std) -> np.ndarray:
    """Normalized (C, H, W) -> uint8 (H, W, C) for display."""
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    img = (x.cpu() * std + mean).clamp(0, 1)
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _wrap(text: str, width_px: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width_px:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def save_grid(panels: dict[str, Tensor], path: str | Path, mean, std, scale: int = 2,
              names: list[str] | None = None) -> Path:
    """Write a PNG: a header with the column names, one numbered row per image, a caption under the grid.

    ``names`` (the image files of the rows) go into ``<path>.json`` beside the PNG, with the column
    names and the caption; without names the rows are listed by number only.
    """
    cols = [c for c in COLUMNS if c in panels]
    N, _, H, W = panels["original"].shape
    pad = 2
    tiles = np.full((N * (H + pad) + pad, len(cols) * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(N):
        for j, name in enumerate(cols):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            tile = to_uint8(panels[name][i], mean, std)
            if name == "masked":
                # Masked patches in mid-gray rather than the normalized-space zero.
                hidden = panels["mask"][i, 0].cpu().numpy() > 0.5
                tile = tile.copy()
                tile[hidden] = 128
            tiles[y : y + H, x : x + W] = tile
    grid = Image.fromarray(tiles)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    norm_pix = bool(panels["norm_pix"]) if "norm_pix" in panels else True
    caption = NORM_PIX_NOTE if norm_pix else PIXEL_NOTE
    font = ImageFont.load_default(size=11)
    margin, cell_w, cell_h = 22, (W + pad) * scale, (H + pad) * scale
    probe = ImageDraw.Draw(grid)
    width = max(grid.width + margin, 420)
    rows = f"files in {Path(path).with_suffix('.json').name}" if names else f"images 0..{N - 1}"
    cap_lines = _wrap(f"{caption}. Rows: {rows}.", width - 8, font, probe)
    header = 16
    canvas = Image.new("RGB", (width, header + grid.height + 14 * len(cap_lines) + 6), "white")
    canvas.paste(grid, (margin, header))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        label = COLUMNS[name]
        while draw.textlength(label, font=font) > cell_w and len(label) > 4:
            label = label[:-2] + "."
        draw.text((margin + j * cell_w + pad * scale, 2), label, fill="black", font=font)
    for i in range(N):
        draw.text((3, header + i * cell_h + cell_h // 2 - 6), str(i), fill="black", font=font)
    for k, line in enumerate(cap_lines):
        draw.text((4, header + grid.height + 4 + 14 * k), line, fill="black", font=font)
    path = Path(path)
    canvas.save(path)
    info = {"columns": [COLUMNS[c] for c in cols], "caption": caption,
            "rows": [{"row": i, "file": names[i] if names else None} for i in range(N)]}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def pick_images(source, n: int, img_size: int, seed: int, mean, std) -> tuple[Tensor, list[str]]:
    """A fixed, seeded choice of ``n`` files of a data source, decoded as the evaluation loader does
    (short side resize, center crop) -> (normalized float (n, 3, S, S), their file names)."""
    import io

    from fastmae.data.augment import eval_params, pil_apply

    order = np.random.default_rng(seed).permutation(len(source))[:n]
    arrays, names = [], []
    for i in sorted(order.tolist()):
        with Image.open(io.BytesIO(source.read_bytes(i))) as im:
            im.load()
            arrays.append(pil_apply(im, img_size, False, eval_params(im.width, im.height, img_size)))
        names.append(os.path.relpath(source.names[i], source.root) if source.kind == "folder" else source.names[i])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x, names


def save_curves(metrics_path: str | Path, path: str | Path, title: str = "") -> Path | None:
    """Training loss and learning rate against the optimizer step (from ``metrics.jsonl``) as a PNG.

    Returns None when matplotlib is not installed or nothing was logged.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from fastmae.engine.logger import read_metrics_lines

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    rows = [r for _, r in read_metrics_lines(Path(metrics_path)) if r is not None and "step" in r and number(r.get("loss"))]
    rows = [r if number(r.get("lr")) else {**r, "lr": float("nan")} for r in rows]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], marker="." if len(rows) < 30 else None)
    ax_loss.set_ylabel("train loss (masked patches)")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    if title:
        ax_loss.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
