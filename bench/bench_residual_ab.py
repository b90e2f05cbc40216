"""A/B of the residual stream dtype under bf16 autocast: fp32 (official numerics) vs bf16, same seeds.

    python bench/bench_residual_ab.py --presets tiny small --seeds 0 1 2 --epochs tiny=20 small=8

Each (preset, seed, residual_dtype) is one ``fastmae pretrain`` run on the embedded demo set with
``--precision=bf16`` (without autocast the residual dtype changes nothing), one process at a time.
A finished run (its summary.json exists) is read back, not rerun. Prints a markdown table of the
held-out and last-window training losses per run, then per preset the mean and seed spread of each
arm and the bf16 - fp32 difference against the seed noise (max - min of the fp32 arm); writes
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


def run_one(preset: str, seed: int, residual: str, epochs: int, out: Path, threads: int) -> dict:
    run_dir = out / f"{preset}-seed{seed}-{residual}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", f"--preset={preset}", f"--seed={seed}",
               f"--residual_dtype={residual}", "--precision=bf16", f"--epochs={epochs}",
               f"--warmup_epochs={max(1, epochs // 10)}", f"--output_dir={run_dir}", "--progress=false",
               "--tensorboard=false", f"--threads={threads}"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    s = json.loads(summary.read_text())
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"preset": preset, "seed": seed, "residual_dtype": residual, "epochs": epochs, "steps": s["step"],
            "train_loss": s["train_loss"], "val_loss": s["val_loss"], "img_s": s["img_s"],
            "curve": [(r["step"], r["loss"]) for r in curve]}


def verdict(rows: list[dict], key: str) -> str:
    by = {r: [x[key] for x in rows if x["residual_dtype"] == r] for r in ("fp32", "bf16")}
    m32, m16 = statistics.mean(by["fp32"]), statistics.mean(by["bf16"])
    noise = max(max(by["fp32"]) - min(by["fp32"]), max(by["bf16"]) - min(by["bf16"]))
    agree = abs(m16 - m32) <= noise
    return (f"{key}: fp32 {m32:.4f} (range {min(by['fp32']):.4f}-{max(by['fp32']):.4f}), bf16 {m16:.4f} "
            f"(range {min(by['bf16']):.4f}-{max(by['bf16']):.4f}); diff {m16 - m32:+.4f} vs seed spread {noise:.4f}: "
            + ("within noise" if agree else "OUTSIDE noise"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for r in (r for r in rows if r["preset"] == preset):
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, color="C0" if r["residual_dtype"] == "fp32" else "C3", alpha=0.7,
                    label=f"{r['residual_dtype']} seed {r['seed']}")
        ax.set(title=f"{preset}: residual fp32 (blue) vs bf16 (red)", xlabel="step", ylabel="train loss")
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
    args = ap.parse_args()
    epochs = {k: int(v) for k, v in (e.split("=") for e in args.epochs)}
    rows = [run_one(p, s, r, epochs[p], Path(args.out), args.threads)
            for p in args.presets for s in args.seeds for r in ("fp32", "bf16")]
    print("| preset | seed | residual | steps | train loss | held-out loss | img/s |\n|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['seed']} | {r['residual_dtype']} | {r['steps']} | {r['train_loss']:.4f} | "
              f"{r['val_loss']:.4f} | {r['img_s']:.1f} |")
    for p in args.presets:
        sub = [r for r in rows if r["preset"] == p]
        print(f"\n{p}: {verdict(sub, 'val_loss')}\n{p}: {verdict(sub, 'train_loss')}")
    plot(rows, ROOT / "bench" / "figures" / "residual_ab.png")
    append_csv([{k: v for k, v in r.items() if k != "curve"} | {"bench": "residual_ab"} for r in rows])


if __name__ == "__main__":
    main()
