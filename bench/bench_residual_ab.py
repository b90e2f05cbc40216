"""A/B of the residual stream dtype under bf16 autocast: fp32 (official numerics) vs bf16, same seeds.

    python bench/bench_residual_ab.py --presets tiny small --seeds 0 1 2 --epochs tiny=20 small=8
    python bench/bench_residual_ab.py --presets tiny --epochs tiny=15 --arms fp32:--residual_dtype=fp32 fp8:--fp8=rowwise

``--arms NAME:FLAGS ...`` compares other run keys the same way (the first arm is the reference; FLAGS are
comma-separated ``--key=value``); the default arms are ``fp32`` and ``bf16`` residual streams.
Each (preset, seed, residual_dtype) is one ``fastmae pretrain`` run on the embedded demo set with
``--precision=bf16`` (without autocast the residual dtype changes nothing), one process at a time.
A finished run (its summary.json exists) is read back, not rerun. Prints a markdown table of the
held-out and last-window training losses per run, then per preset the mean and seed spread of each
arm and the bf16 - fp32 difference against the seed noise (max - min of the fp32 arm), and how far each
run is from converged (the training loss's relative change between the run's last two tenths); writes
rows to bench/results/residual_ab.csv. Saves the loss curves of both arms to bench/figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _harness import append_csv

ROOT = Path(__file__).resolve().parents[1]


def run_one(preset: str, seed: int, arm: str, flags: list[str], epochs: int, out: Path, threads: int) -> dict:
    run_dir = out / f"{preset}-seed{seed}-{arm}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", f"--preset={preset}", f"--seed={seed}",
               *flags, "--precision=bf16", f"--epochs={epochs}",
               f"--warmup_epochs={max(1, epochs // 10)}", f"--output_dir={run_dir}", "--progress=false",
               "--tensorboard=false", f"--threads={threads}"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    s = json.loads(summary.read_text())
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"preset": preset, "seed": seed, "arm": arm, "flags": " ".join(flags), "epochs": epochs, "steps": s["step"],
            "train_loss": s["train_loss"], "val_loss": s["val_loss"], "img_s": s["img_s"],
            "curve": [(r["step"], r["loss"]) for r in curve]}


def plateau(curve: list[tuple[int, float]]) -> float:
    """Relative change of the mean training loss between the last two tenths of the run: near 0 = converged."""
    tenth = max(1, len(curve) // 10)
    last = statistics.mean(v for _, v in curve[-tenth:])
    before = statistics.mean(v for _, v in curve[-2 * tenth:-tenth] or curve[-tenth:])
    return (last - before) / before


def verdict(rows: list[dict], key: str, a: str, b: str) -> str:
    """Mean and seed range of each arm, and whether the difference of the means is within the seed spread."""
    by = {r: [x[key] for x in rows if x["arm"] == r] for r in (a, b)}
    ma, mb = statistics.mean(by[a]), statistics.mean(by[b])
    noise = max(max(v) - min(v) for v in by.values())
    return (f"{key}: {a} {ma:.4f} (range {min(by[a]):.4f}-{max(by[a]):.4f}), {b} {mb:.4f} "
            f"(range {min(by[b]):.4f}-{max(by[b]):.4f}); diff {mb - ma:+.4f} vs seed spread {noise:.4f}: "
            + ("within noise" if abs(mb - ma) <= noise else "OUTSIDE noise"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.5), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        for r in (r for r in rows if r["preset"] == preset):
            steps, losses = zip(*r["curve"], strict=True)
            ax.plot(steps, losses, color="C0" if r["arm"] == rows[0]["arm"] else "C3", alpha=0.7,
                    label=f"{r['arm']} seed {r['seed']}")
        ax.set(title=f"{preset}: {rows[0]['arm']} (blue) vs the other arm (red)", xlabel="step", ylabel="train loss")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", nargs="+", default=["tiny=20", "small=8"], help="PRESET=EPOCHS")
    ap.add_argument("--out", default=str(ROOT / "runs" / "residual_ab"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", nargs=2, default=["fp32:--residual_dtype=fp32", "bf16:--residual_dtype=bf16"],
                    help="two NAME:FLAGS arms, the reference first")
    args = ap.parse_args()
    epochs = {k: int(v) for k, v in (e.split("=") for e in args.epochs)}
    arms = {name: flags.split(",") for name, _, flags in (a.partition(":") for a in args.arms)}
    a, b = arms
    rows = [run_one(p, s, arm, flags, epochs[p], Path(args.out), args.threads)
            for p in args.presets for s in args.seeds for arm, flags in arms.items()]
    print("| preset | seed | arm | steps | train loss | held-out loss | last-tenth change | img/s |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['seed']} | {r['arm']} | {r['steps']} | {r['train_loss']:.4f} | "
              f"{r['val_loss']:.4f} | {plateau(r['curve']):+.2%} | {r['img_s']:.1f} |")
    for p in args.presets:
        sub = [r for r in rows if r["preset"] == p]
        print(f"\n{p}: {verdict(sub, 'val_loss', a, b)}\n{p}: {verdict(sub, 'train_loss', a, b)}")
    plot(rows, ROOT / "bench" / "figures" / f"ab_{a}_vs_{b}.png")
    append_csv([{k: v for k, v in r.items() if k != "curve"} | {"bench": "residual_ab"} for r in rows])


if __name__ == "__main__":
    main()
