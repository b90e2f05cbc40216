"""A streamed linear probe: the frozen encoder on every training step against features computed once (the store).

    python bench/bench_features.py                       # ViT 192-wide, depth 12, 64 px, 10 epochs, 2 rounds
    python bench/bench_features.py --epochs 30 --embed_dim 384 --heads 6

Data: fastmae's demo photos as a train/val class-folder tree (320 + 60 JPEGs), ``--augment=eval``, a random
encoder (the cost is the same for a pretrained one). Three contenders, run in interleaved rounds, each a whole
``fastmae linprobe`` run in-process, wall clock:

- ``every step``: ``--features=off``, decode + encoder + head for every batch of every epoch (the reference);
- ``store, built``: ``--features=auto`` into a fresh run folder: one extraction pass, then the head on the store;
- ``store, reused``: ``--features=DIR`` of a store built before the timed rounds: the head only.

The histories of the first two are compared (they must agree; tests/test_eval_features.py checks it too).
Prints a markdown table; appends rows to bench/results/linprobe_features.csv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _harness import append_csv, stamp


def run(tree: Path, out: Path, args, features: str) -> tuple[float, list]:
    from fastmae.eval import linprobe

    argv = [f"--data={tree}", "--num_workers=0", "--progress=false", "--quiet=true", f"--batch_size={args.batch}",
            f"--eval_batch_size={args.batch}", f"--img_size={args.img}", "--in_chans=3", "--patch_size=8",
            f"--embed_dim={args.embed_dim}", f"--depth={args.depth}", f"--num_heads={args.heads}", "--augment=eval",
            f"--epochs={args.epochs}", "--save_ckpt=false", f"--output_dir={out}", f"--features={features}"]
    t0 = time.perf_counter()
    if linprobe.main(argv) != 0:
        raise SystemExit(f"linprobe failed: {' '.join(argv)}")
    wall = time.perf_counter() - t0
    history = json.loads((out / "results.json").read_text())["history"]
    return wall, [(h["train_loss"], h["val_top1"]) for h in history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--embed_dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from fastmae.data import prepare_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_features-"))
    try:
        tree = prepare_demo_dataset(work / "photos")
        shared = work / "shared-store"
        run(tree, work / "warm", args, str(shared))  # builds the shared store; warms the decoders and caches
        times: dict[str, list[float]] = {"every step": [], "store, built": [], "store, reused": []}
        histories = {}
        for r in range(args.rounds):
            for name, features in (("every step", "off"), ("store, built", "auto"), ("store, reused", str(shared))):
                wall, histories[name] = run(tree, work / f"{r}-{name.replace(', ', '-').replace(' ', '-')}", args,
                                            features)
                times[name].append(wall)
        ref = histories["every step"]
        agree = all(abs(a[0] - b[0]) <= 1e-4 * max(1.0, abs(b[0])) for a, b in zip(histories["store, built"], ref, strict=True))
        base = min(times["every step"])
        env = stamp(torch.device("cpu"))
        print(f"streamed linear probe, {args.epochs} epochs, 320 train + 60 val images, ViT {args.embed_dim}-wide depth "
              f"{args.depth} at {args.img} px, batch {args.batch}; {env['device']}, git {env['git']}, {env['date']}")
        print(f"histories of 'store, built' and 'every step' agree (train loss within 1e-4): {agree}\n")
        print("| contender | wall s (best of rounds) | vs every step |")
        print("|---|---|---|")
        rows = []
        for name, ts in times.items():
            print(f"| {name} | {min(ts):.2f} | {base / min(ts):.2f}x |")
            rows.append({"bench": "linprobe_features", "contender": name, "wall_s": round(min(ts), 3),
                         "speedup": round(base / min(ts), 3), "epochs": args.epochs, "embed_dim": args.embed_dim,
                         "depth": args.depth, "img": args.img, "agree": agree, **env})
        print(f"\nrows appended to {append_csv(rows)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
