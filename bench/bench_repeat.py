"""Repeated sampling at demo scale: pretraining loss and linear probe at equal optimizer steps for K = 1, 2, 4.

    python bench/bench_repeat.py                      # seeds 0 1 2, 88 steps (4 epochs of K=1), batch 64
    python bench/bench_repeat.py --seeds 0 --steps 100

scikit-learn's 1,797 digits are written once as a class-folder tree of 32 x 32 RGB JPEGs (80 % train/, 20 %
val/). Each (K, seed) pretrains the tiny MAE through the real loader (``train.py --repeat_samples=K
--decode=fast``: K crops of each decoded file per batch, each with its own mask) for the same number of
optimizer steps, batch size and schedule (warm-up and cosine in optimizer steps), so K = 2 and 4 see half
and a quarter of the distinct files per step. The encoder is the tiny preset's with a small decoder (64 wide,
2 blocks) so that nine runs fit a shared 2-core machine. Then ``fastmae linprobe`` (digits preset: frozen
features computed once, 100 epochs) probes the frozen encoder on the embedded digits' own split (75/25);
that split's test images were among the label-free pretraining files of every K alike, so the probe
compares K with each other, not with a held-out SSL figure. ``--ckpt=random`` is the untrained baseline.
The table gives the mean and spread (min-max) over seeds of the training loss at four points and of the
probe top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parent.parent


def digits_tree(root: Path) -> Path:
    from sklearn.datasets import load_digits

    out = root / "digits-tree-32"
    if (out / "val").is_dir():
        return out
    d = load_digits()
    rng = np.random.default_rng(0)
    is_val = rng.random(len(d.target)) < 0.2
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        folder = out / ("val" if is_val[i] else "train") / f"d{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        gray.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
    return out


def run(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def one(tree: Path, out: Path, k: int, seed: int, args, env: dict) -> dict:
    run_dir = out / f"k{k}-s{seed}"
    if not (run_dir / "summary.json").is_file():
        run([sys.executable, "train.py", f"--data={tree}", f"--output_dir={run_dir}", "--img_size=32", "--patch_size=4",
             f"--batch_size={args.batch}", f"--max_steps={args.steps}", f"--repeat_samples={k}", "--decode=fast",
             f"--seed={seed}", "--num_workers=1", "--progress=false", "--tensorboard=false", "--log_every=22",
             "--decoder_embed_dim=64", "--decoder_depth=2", "--decoder_num_heads=4",
             # epochs count samples (K x files): dividing by K keeps warm-up and cosine equal in optimizer steps
             f"--warmup_epochs={args.warmup_epochs / k}", f"--epochs={args.epochs // k}"], env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return {"loss": losses, "top1": probe(run_dir, out / f"probe-k{k}-s{seed}", seed, args, env)}


def probe(ckpt: Path | str, probe_dir: Path, seed: int, args, env: dict) -> float:
    """Linear-probe top-1 on the embedded digits at 32 px RGB (``fastmae linprobe``'s digits preset)."""
    if not (probe_dir / "results.json").is_file():
        run([sys.executable, "-m", "fastmae.cli", "linprobe", f"--ckpt={ckpt}", "--img_size=32", "--in_chans=3",
             "--patch_size=4", f"--output_dir={probe_dir}", f"--seed={seed}", f"--epochs={args.probe_epochs}"], env)
    return json.loads((probe_dir / "results.json").read_text())["top1"]


def spread(v: list[float]) -> str:
    return f"{statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=88)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4,
                    help="cosine length in epochs of K=1 (22 steps each at batch 64); a multiple of every K")
    ap.add_argument("--warmup_epochs", type=float, default=1.0, help="warm-up in epochs of K=1")
    ap.add_argument("--probe_epochs", type=int, default=100)
    ap.add_argument("--data_dir", default="/tmp/fastmae-bench-data")
    args = ap.parse_args()
    if any(args.epochs % k for k in args.ks):
        # epochs are whole (K x files samples each): a K that does not divide them would get a shorter cosine
        raise SystemExit(f"--epochs {args.epochs} must be a multiple of every K in {args.ks} (equal schedules)")
    tree = digits_tree(Path(args.data_dir))
    out = Path(args.data_dir) / f"repeat-{args.steps}-{args.batch}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = {k: [one(tree, out, k, s, args, env) for s in args.seeds] for k in args.ks}
    random_top1 = [probe("random", out / f"probe-random-s{s}", s, args, env) for s in args.seeds]
    points = sorted(res[args.ks[0]][0]["loss"])
    points = [points[0], points[len(points) // 3], points[2 * len(points) // 3], points[-1]]
    print(f"\ndigits 32 px tree, tiny MAE, batch {args.batch}, {args.steps} optimizer steps, seeds {args.seeds}; "
          f"mean (min-max) over seeds\n")
    print("| K | distinct files per step | " + " | ".join(f"loss @ {p}" for p in points) + " | linear probe top-1 |")
    print("|---|---|" + "---|" * len(points) + "---|")
    for k, runs in res.items():
        cells = [spread([r["loss"][p] for r in runs]) for p in points]
        print(f"| {k} | {args.batch // k} | " + " | ".join(cells) + f" | {spread([r['top1'] for r in runs])} |")
    print("| untrained encoder | - | " + " | ".join("-" for _ in points) + f" | {spread(random_top1)} |")


if __name__ == "__main__":
    main()
