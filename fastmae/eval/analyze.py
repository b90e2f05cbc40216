"""``fastmae analyze``: attention locality and head diversity per layer and head ("Revealing the Dark Secrets of MIM").

For every block the attention maps ``softmax(q k^T / sqrt(d))`` of a batch of
images give, per head:

- average attention distance (pixels): for each patch query, the expected
  distance between its patch centre and the key patch centres under its
  attention restricted to patch keys (renormalized: the cls key has no
  position), averaged over queries and images;
- attention entropy (nats): ``-sum_k p log p`` of each query row (all tokens,
  cls included), averaged; log T for uniform attention, 0 for one-hot;
- KL divergence between heads: for head h, the mean over the other heads g of
  ``KL(P_h || P_g)`` per query row, averaged (0 when all heads attend alike).

Linear CKA (Kornblith et al. 2019) compares the representations of every pair
of layers (embeddings = layer 0, block i = layer i): within the first model,
and between the first model and each other one (``cka.csv``, ``cka.png``). A
layer's representation of an image is all its tokens, flattened; CKA works on
the images' centered Gram matrices, so memory is (images x images) per layer.

Several checkpoints (e.g. MAE-pretrained, random init, fine-tuned) go into one
CSV and one figure. ``random`` as a source is a randomly initialized encoder
with the architecture of the first checkpoint.

Example:
    fastmae analyze --ckpts=runs/mae-tiny,random,runs/finetune/checkpoint-best.pt \\
        --labels=mae,random,finetuned --output_dir=runs/analyze
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastmae.constants import IMAGE_EXTENSIONS
from fastmae.eval.config import arch_key
from fastmae.eval.data import load_digits_split
from fastmae.eval.models import RANDOM, build_encoder, read_source, resolve_arch
from fastmae.flags import key, run_cli
from fastmae.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer

KL_EPS = 1e-8
METRICS = ("avg_distance_px", "entropy", "kl_to_other_heads")


# ---- metrics on attention maps (B, H, T, T), cls token first ----------------------------------------------


def patch_centers(grid: tuple[int, int], patch_size: int) -> Tensor:
    """(L, 2) pixel coordinates (row, col) of the patch centres, row-major."""
    gh, gw = grid
    r = (torch.arange(gh, dtype=torch.float64) + 0.5) * patch_size
    c = (torch.arange(gw, dtype=torch.float64) + 0.5) * patch_size
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """attn: (B, H, 1 + L, 1 + L) -> (H,) mean attention distance in pixels over patch queries and images."""
    L = grid[0] * grid[1]
    if attn.shape[-1] != L + 1 or attn.shape[-2] != L + 1:
        raise ValueError(f"attention maps of shape {tuple(attn.shape)} do not match 1 + {L} tokens")
    centers = patch_centers(grid, patch_size)
    dist = torch.cdist(centers, centers).to(attn.device)  # (L, L)
    a = attn[..., 1:, 1:].double()
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2)).float()


def attention_entropy(attn: Tensor) -> Tensor:
    """attn: (B, H, T, T) rows summing to 1 -> (H,) mean row entropy in nats."""
    a = attn.double()
    return (-torch.special.xlogy(a, a).sum(dim=-1)).mean(dim=(0, 2)).float()


def head_kl(attn: Tensor, eps: float = KL_EPS) -> Tensor:
    """attn: (B, H, T, T) -> (H,): for head h, mean over g != h of KL(P_h || P_g), averaged over rows.

    P_g is clamped at ``eps`` so one-hot maps give a finite (large) value.
    """
    H = attn.shape[1]
    if H < 2:
        return torch.zeros(H, dtype=torch.float32, device=attn.device)
    p = attn.double()
    plogp = torch.special.xlogy(p, p).sum(dim=-1)  # (B, H, T)
    logq = p.clamp_min(eps).log()
    # cross[b, h, g, t] = sum_k P_h[t, k] log P_g[t, k]
    cross = torch.einsum("bhtk,bgtk->bhgt", p, logq)
    kl = plogp.unsqueeze(2) - cross  # (B, H, G, T)
    off = ~torch.eye(H, dtype=torch.bool, device=attn.device)
    per_pair = kl.mean(dim=(0, 3))  # (H, G)
    return (per_pair * off).sum(dim=1).div(H - 1).float()


@torch.no_grad()
def attention_stats(model: VisionTransformer, imgs: Tensor, batch: int = 256) -> dict[str, Tensor]:
    """imgs: (N, C, H, W) normalized -> {metric: (depth, heads)} averaged over the images."""
    model.eval()
    _, grid = model.check_images(imgs)
    sums: dict[str, Tensor] = {}
    for i in range(0, len(imgs), batch):
        xb = imgs[i : i + batch]
        x = model.embed_patches(xb, None, grid)
        rows = {m: [] for m in METRICS}
        for blk in model.blocks:
            a = blk.attn.attention_probs(blk.norm1(x))
            rows["avg_distance_px"].append(attention_distance(a, grid, model.patch_size))
            rows["entropy"].append(attention_entropy(a))
            rows["kl_to_other_heads"].append(head_kl(a))
            x = blk(x)
        for m in METRICS:
            s = torch.stack(rows[m]) * len(xb)
            sums[m] = sums[m] + s if m in sums else s
    return {m: (v / len(imgs)).cpu() for m, v in sums.items()}


# ---- linear CKA ------------------------------------------------------------------------------------------


def centered_gram(x: Tensor) -> Tensor:
    """x: (N, ...) features per example -> (N, N) doubly centered Gram matrix H X X^T H (float64)."""
    x = x.reshape(x.shape[0], -1).double()
    k = x @ x.T
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def cka_from_grams(k: Tensor, l: Tensor) -> float:
    """Linear CKA of two centered Gram matrices: <K, L>_F / (|K|_F |L|_F)."""
    den = k.norm() * l.norm()
    return float((k * l).sum() / den) if den > 0 else 0.0


def linear_cka(x: Tensor, y: Tensor) -> float:
    """x: (N, ...), y: (N, ...) -> linear CKA in [0, 1]; 1 for representations equal up to rotation and scale."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    return cka_from_grams(centered_gram(x), centered_gram(y))


@torch.no_grad()
def layer_grams(model: VisionTransformer, imgs: Tensor, batch: int = 256) -> list[Tensor]:
    """imgs: (N, C, H, W) -> per layer (embeddings, then each block) the (N, N) centered Gram of its tokens."""
    model.eval()
    _, grid = model.check_images(imgs)
    outs: list[list[Tensor]] = [[] for _ in range(len(model.blocks) + 1)]
    for i in range(0, len(imgs), batch):
        x = model.embed_patches(imgs[i : i + batch], None, grid)
        outs[0].append(x.flatten(1).double().cpu())
        for j, blk in enumerate(model.blocks):
            x = blk(x)
            outs[j + 1].append(x.flatten(1).double().cpu())
    return [centered_gram(torch.cat(o)) for o in outs]


def cka_matrix(grams_a: list[Tensor], grams_b: list[Tensor]) -> Tensor:
    """(layers of a, layers of b) linear CKA."""
    return torch.tensor([[cka_from_grams(ka, kb) for kb in grams_b] for ka in grams_a])


def plot_cka(mats: dict[tuple[str, str], Tensor], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8), squeeze=False)
    for ax, ((a, b), m) in zip(axes[0], mats.items(), strict=True):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, origin="lower", cmap="magma")
        ax.set_xlabel(f"{b} layer (0 = embeddings)")
        ax.set_ylabel(f"{a} layer (0 = embeddings)")
        ax.set_title(f"linear CKA: {a} vs {b}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- command line ---------------------------------------------------------------------------------------


@dataclass
class AnalyzeConfig:
    preset: str = key("default", "named set of defaults; the values below are this preset's")
    ckpts: str = key("random", "comma-separated checkpoint files; 'random' = random init of the first one's "
                      "architecture")
    labels: str = key("", "comma-separated names for the figure (default: file names)")
    images: str = key("digits", "'digits' (held-out split), a folder, or comma-separated image files")
    num_images: int = key(256, "how many images to use")
    cka: bool = field(default=True, metadata={
        "help": "layer-by-layer linear CKA within the first model and against each other (cka.csv, cka.png)"})
    output_dir: str = key("runs/analyze", "run folder (config, metrics, checkpoints, summary, pictures)")
    seed: int = key(0, "random seed (data order, masks, init)")
    device: str = key("cpu", "auto | cpu | cuda | cuda:N")
    img_size: int = arch_key("img_size")
    patch_size: int = arch_key("patch_size")
    in_chans: int = arch_key("in_chans")
    embed_dim: int = arch_key("embed_dim")
    depth: int = arch_key("depth")
    num_heads: int = arch_key("num_heads")

    def validate(self) -> None:
        if not [s for s in self.ckpts.split(",") if s.strip()]:
            raise ValueError("--ckpts needs at least one checkpoint (or 'random')")
        if self.labels and len(self.labels.split(",")) != len(self.ckpts.split(",")):
            raise ValueError(f"--labels has {len(self.labels.split(','))} names for {len(self.ckpts.split(','))} checkpoints")
        if self.num_images < 1:
            raise ValueError(f"num_images must be positive, got {self.num_images}")


def load_images(spec: str, img_size: int, in_chans: int, n: int, mean=None, std=None, seed: int = 0) -> Tensor:
    """Normalized (n', C, S, S) images: the digits' held-out split, or image files (a folder or a comma list)."""
    if spec == "digits":
        x = load_digits_split(img_size, in_chans, seed=seed).test_x
        return x[:n]
    from PIL import Image

    files: list[Path] = []
    for part in spec.split(","):
        p = Path(part.strip())
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"image path not found: {p}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {spec!r}")
    mode = "L" if in_chans == 1 else "RGB"
    arrs = []
    for f in files[:n]:
        with Image.open(f) as im:
            arr = torch.from_numpy(np.array(im.convert(mode).resize((img_size, img_size), Image.BICUBIC)))
        arrs.append(arr.float().div(255).reshape(img_size, img_size, in_chans).permute(2, 0, 1))
    x = torch.stack(arrs)
    if mean is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _load_models(cfg: AnalyzeConfig) -> list[tuple[str, VisionTransformer, dict]]:
    sources = [s.strip() for s in cfg.ckpts.split(",")]
    labels = [s.strip() for s in cfg.labels.split(",")] if cfg.labels else [
        "random" if s.lower() in RANDOM else Path(s).stem for s in sources]
    loaded = [(label, *read_source(s)) for label, s in zip(labels, sources, strict=True)]
    first = next(((sd, meta) for _, sd, meta in loaded if sd is not None), (None, {}))
    out = []
    for label, sd, meta in loaded:
        arch = resolve_arch(first[0] if sd is None else sd, first[1] if sd is None else meta, asdict(cfg))
        torch.manual_seed(cfg.seed)
        try:
            model = build_encoder(arch, sd, global_pool="fc_norm.weight" in (sd or {}))
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        out.append((label, model.to(cfg.device), meta))
    return out


def plot(stats: dict[str, dict[str, Tensor]], path: Path) -> Path:
    """One figure, one panel per metric, one colour per model: head values as dots, head mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    titles = {"avg_distance_px": "avg attention distance (px)", "entropy": "attention entropy (nats)",
              "kl_to_other_heads": "KL to other heads (nats)"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for j, (label, s) in enumerate(stats.items()):
        color = f"C{j}"
        for ax, m in zip(axes, METRICS, strict=True):
            v = s[m].numpy()  # (depth, heads)
            layers = range(1, v.shape[0] + 1)
            for h in range(v.shape[1]):
                ax.scatter([li + 0.06 * (j - 1) for li in layers], v[:, h], s=10, color=color, alpha=0.5)
            ax.plot(layers, v.mean(axis=1), color=color, label=label)
    for ax, m in zip(axes, METRICS, strict=True):
        ax.set_title(titles[m])
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def analyze(cfg: AnalyzeConfig) -> dict[str, dict[str, Tensor]]:
    cfg.validate()
    models = _load_models(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    stats: dict[str, dict[str, Tensor]] = {}
    grams: dict[str, list[Tensor]] = {}
    for label, model, meta in models:
        C, S = model.in_chans, model.patch_embed.img_size[0]
        imgs = load_images(cfg.images, S, C, cfg.num_images, meta.get("pixel_mean"), meta.get("pixel_std"), cfg.seed)
        stats[label] = attention_stats(model, imgs.to(cfg.device))
        if cfg.cka:
            grams[label] = layer_grams(model, imgs.to(cfg.device))
    if cfg.cka:
        first = models[0][0]
        mats = {(first, b): cka_matrix(grams[first], grams[b]) for b in grams}
        with (out / "cka.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model_a", "layer_a", "model_b", "layer_b", "cka"])
            for (a, b), m in mats.items():
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        w.writerow([a, i, b, j, f"{m[i, j].item():.6f}"])
        plot_cka(mats, out / "cka.png")
    with (out / "attention_stats.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "layer", "head", *METRICS])
        for label, s in stats.items():
            depth, heads = s[METRICS[0]].shape
            for li in range(depth):
                for h in range(heads):
                    w.writerow([label, li + 1, h, *(f"{s[m][li, h].item():.6f}" for m in METRICS)])
    plot(stats, out / "attention_stats.png")
    return stats


def _body(cfg: AnalyzeConfig) -> int:
    stats = analyze(cfg)
    for label, s in stats.items():
        d = ", ".join(f"{v:.2f}" for v in s["avg_distance_px"].mean(1).tolist())
        print(f"{label}: mean attention distance per layer (px): {d}")
    print(f"wrote {cfg.output_dir}/attention_stats.csv and attention_stats.png"
          + (" and cka.csv, cka.png" if cfg.cka else ""))
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, AnalyzeConfig, {"default": {}}, _body, "analyze", __doc__)
