"""CrossMAE vs MAE in one run: training-step time, FLOPs per image, and representation quality on digits.

    python bench/bench_crossmae.py speed                 # tiny (64 px) and ViT-B (224 px, batch 2): fp32 and bf16
    python bench/bench_crossmae.py quality               # digits: pretrain MAE and CrossMAE, probe / partial / full vs random
    python bench/bench_crossmae.py curves                # digits: linear probe vs mask ratio and vs decoder depth (PNG)

speed: the training step fastmae pretrain runs (fastmae.engine.step.train_step: autocast forward, backward,
gradient norm, fused AdamW) for MAE, CrossMAE with
the paper's ViT-B decoder (512 x 12, feature fusion, prediction ratio 0.25) and CrossMAE with MAE's
decoder shape (512 x 8, no fusion), rounds interleaved, medians after warm-up; the ratio column is
MAE's median over the contender's. FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode
over one forward+backward with eager attention (the CPU SDPA kernel is not counted).

quality and curves: the digits demo's recipe (fastmae.eval: 16 px grayscale, width 64, depth 4, patch 4;
pretraining on the training split, labels unused; the MAE protocols on the held-out split), one torch
thread. Markdown tables to stdout, rows to bench/results/bench_crossmae.csv, PNGs to bench/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _harness import RESULTS_DIR, append_csv, interleaved, make_train_step, median_ms, stamp

from fastmae.layers import set_attention_backend
from fastmae.models import CrossMAE, crossmae_vit_base_patch16, crossmae_vit_tiny, mae_vit_base_patch16, mae_vit_tiny
from fastmae.models.vit import LayerNorm6

# ---- speed and FLOPs -------------------------------------------------------------------------------------------

SPEED_CASES = {
    # name: (img_size, batch, {contender: factory})
    "tiny": (64, 32, {
        "MAE": lambda: mae_vit_tiny(norm_pix_loss=True),
        "CrossMAE": lambda: crossmae_vit_tiny(norm_pix_loss=True),
        "CrossMAE no fusion": lambda: crossmae_vit_tiny(norm_pix_loss=True, feature_fusion=False),
    }),
    "ViT-B/16": (224, 2, {
        "MAE": lambda: mae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE": lambda: crossmae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE dec 8, no fusion": lambda: crossmae_vit_base_patch16(norm_pix_loss=True, decoder_depth=8,
                                                                       feature_fusion=False),
    }),
}


def train_flops_per_image(model, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    set_attention_backend("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            model(x, 0.75)[0].backward()
    finally:
        set_attention_backend(None)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def run_speed(args) -> list[dict]:
    device = torch.device("cpu")
    torch.set_flush_denormal(True)
    rows = []
    lines = ["| model | precision | contender | batch | median ms/step | MAE / contender | train GFLOP/img "
             "| MAE / contender FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for case, (img, batch, factories) in SPEED_CASES.items():
        if args.cases and case not in args.cases:
            continue
        torch.manual_seed(0)
        models = {name: f() for name, f in factories.items()}
        x = torch.randn(batch, 3, img, img)
        flops = {name: train_flops_per_image(m, x) for name, m in models.items()}
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            steps = {}
            for name, m in models.items():
                m = copy.deepcopy(m)
                steps[name] = make_train_step(m, device, dtype, m, x, 0.75)
            times = interleaved(steps, device, args.warmup, args.repeats)
            base = median_ms(times["MAE"])
            for name in models:
                ms = median_ms(times[name])
                row = {"bench": "bench_crossmae", "part": "speed", "case": case, "precision": precision, "contender": name,
                       "batch": batch, "median_ms": round(ms, 2), "speedup_vs_mae": round(base / ms, 3),
                       "train_gflop_per_img": round(flops[name] / 1e9, 3),
                       "flops_ratio_vs_mae": round(flops["MAE"] / flops[name], 3), **stamp(device)}
                rows.append(row)
                lines.append(f"| {case} | {precision} | {name} | {batch} | {ms:.1f} | {base / ms:.2f}x "
                             f"| {flops[name] / 1e9:.2f} | {flops['MAE'] / flops[name]:.2f}x |")
            print("\n".join(lines[-len(models):]), flush=True)
    print("\n" + "\n".join(lines))
    return rows


# ---- digits quality ------------------------------------------------------------------------------------------------


def digits_model(method: str, arch: dict, split, decoder_depth: int = 2, prediction_ratio: float = 0.25,
                 fusion: bool = True):
    from fastmae.eval.pretrain_digits import tiny_digits_mae

    if method == "mae":
        return tiny_digits_mae(arch, 64, decoder_depth, False, split.mean, split.std)
    return CrossMAE(**arch, decoder_embed_dim=64, decoder_depth=decoder_depth, decoder_num_heads=4, norm_layer=LayerNorm6,
                    norm_pix_loss=False, prediction_ratio=prediction_ratio, feature_fusion=fusion,
                    pixel_mean=tuple(split.mean), pixel_std=tuple(split.std))


def pretrain_and_eval(model, arch, split, out: Path, epochs: int, mask_ratio: float, protocols, seed: int = 0) -> dict:
    from fastmae.eval.pretrain_digits import pretrain
    from fastmae.eval.protocol import run_eval

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pre = pretrain(model, split.train_x, epochs=epochs, batch_size=128, blr=1.5e-3, mask_ratio=mask_ratio, seed=seed)
    result = {"pretrain_s": time.perf_counter() - t0, "final_loss": pre["losses"][-1]}
    sd = model.state_dict()
    meta = {"arch": arch, "pixel_mean": list(split.mean), "pixel_std": list(split.std)}
    for name, ecfg in protocols(out):
        r = run_eval(ecfg, split=split, source_sd=sd, source_meta=meta)
        result[name] = r["best_acc"]
        result[f"{name}_last"] = r["last_acc"]
    return result


def protocol_configs(arch, epochs: dict, init: str, seed: int = 0):
    from fastmae.eval.finetune import FinetuneConfig
    from fastmae.eval.linprobe import LinprobeConfig

    def make(out: Path):
        specs = [("linear probe", LinprobeConfig, dict(epochs=epochs["probe"])),
                 ("partial fine-tune", FinetuneConfig, dict(epochs=epochs["partial"], tune_blocks=1)),
                 ("full fine-tune", FinetuneConfig, dict(epochs=epochs["full"], tune_blocks=-1))]
        for name, cls, kw in specs:
            if kw["epochs"]:
                yield name, cls(**kw, output_dir=str(out / name.split()[0]), seed=seed, quiet=True, ckpt=init,
                                embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"])

    return make


def run_quality(args) -> list[dict]:
    from fastmae.eval.data import load_digits_split
    from fastmae.eval.models import DIGITS_ARCH
    from fastmae.eval.protocol import run_eval

    torch.set_num_threads(1)
    arch = dict(DIGITS_ARCH)
    split = load_digits_split(arch["img_size"], arch["in_chans"], seed=0)
    out = Path(args.output_dir)
    epochs = {"probe": args.probe_epochs, "partial": args.partial_epochs, "full": args.finetune_epochs}
    contenders = {
        "MAE": dict(method="mae"),
        "CrossMAE (pred 0.25, fusion)": dict(method="crossmae", prediction_ratio=0.25, fusion=True),
        "CrossMAE (pred 0.75 = all masked, fusion)": dict(method="crossmae", prediction_ratio=0.75, fusion=True),
    }
    results = {}
    meta = {"arch": arch, "pixel_mean": list(split.mean), "pixel_std": list(split.std)}
    rnd = {}
    for name, ecfg in protocol_configs(arch, epochs, "random")(out / "random"):
        rnd[name] = run_eval(ecfg, split=split, source_sd=None, source_meta=meta)["best_acc"]
    results["random init"] = rnd
    print(f"random init: {rnd}", flush=True)
    for label, kw in contenders.items():
        torch.manual_seed(0)
        model = digits_model(kw.pop("method"), arch, split, **kw)
        results[label] = pretrain_and_eval(model, arch, split, out / label.split()[0].lower(), args.pretrain_epochs, 0.75,
                                           protocol_configs(arch, epochs, "pretrained"))
        print(f"{label}: {results[label]}", flush=True)
    names = ["linear probe", "partial fine-tune", "full fine-tune"]
    lines = [f"Digits (16 px, width 64, depth 4, patch 4), pretraining {args.pretrain_epochs} epochs at mask 0.75; "
             f"probe {epochs['probe']} / partial {epochs['partial']} / full {epochs['full']} epochs; top-1, best epoch.", "",
             "| encoder | pretrain s | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows = []
    for label, r in results.items():
        pre_s = f"{r['pretrain_s']:.0f}" if "pretrain_s" in r else "-"
        lines.append(f"| {label} | {pre_s} | " + " | ".join(f"{r[n]:.3f}" for n in names if n in r) + " |")
        rows.append({"bench": "bench_crossmae", "part": "quality", "contender": label,
                     "pretrain_epochs": args.pretrain_epochs, **{n: r.get(n) for n in names},
                     "pretrain_s": r.get("pretrain_s"), **stamp(torch.device("cpu"))})
    print("\n" + "\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    return rows


def run_curves(args) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmae.eval.data import load_digits_split
    from fastmae.eval.models import DIGITS_ARCH

    torch.set_num_threads(1)
    arch = dict(DIGITS_ARCH)
    split = load_digits_split(arch["img_size"], arch["in_chans"], seed=0)
    out = Path(args.output_dir)
    epochs = {"probe": args.probe_epochs, "partial": 0, "full": 0}
    sweeps = {"mask_ratio": [float(v) for v in args.mask_ratios], "decoder_depth": [int(v) for v in args.decoder_depths]}
    rows, acc, done = [], {}, {}
    for key, values in sweeps.items():
        for method in args.methods:
            for v in values:
                ratio = v if key == "mask_ratio" else 0.75
                depth = v if key == "decoder_depth" else 2
                if (method, ratio, depth) not in done:  # the default point sits on both curves: run it once
                    torch.manual_seed(0)
                    kw = {"decoder_depth": depth} if method == "mae" else {"decoder_depth": depth, "prediction_ratio": 0.25}
                    model = digits_model(method, arch, split, **kw)
                    done[(method, ratio, depth)] = pretrain_and_eval(
                        model, arch, split, out / f"curve_{method}_{ratio}_{depth}", args.pretrain_epochs, ratio,
                        protocol_configs(arch, epochs, "pretrained"))
                r = done[(method, ratio, depth)]
                acc[(key, method, v)] = r["linear probe"]
                print(f"{key}={v} {method}: linear probe {r['linear probe']:.3f} ({r['pretrain_s']:.0f}s)", flush=True)
                rows.append({"bench": "bench_crossmae", "part": "curves", "sweep": key, "value": v, "contender": method,
                             "pretrain_epochs": args.pretrain_epochs, "linear probe": r["linear probe"],
                             **stamp(torch.device("cpu"))})
    RESULTS_DIR.mkdir(exist_ok=True)
    for key, values in sweeps.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
        for method in args.methods:
            ax.plot(values, [100 * acc[(key, method, v)] for v in values], marker="o",
                    label={"mae": "MAE", "crossmae": "CrossMAE (pred 0.25)"}[method])
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("digits linear probe top-1 (%)")
        ax.set_title(f"digits, {args.pretrain_epochs} pretraining epochs")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = RESULTS_DIR / f"crossmae_digits_vs_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("speed", "quality", "curves"))
    ap.add_argument("--cases", nargs="*", default=[], help="speed: subset of " + ", ".join(SPEED_CASES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output_dir", default="runs/bench_crossmae")
    ap.add_argument("--pretrain_epochs", type=int, default=300)
    ap.add_argument("--probe_epochs", type=int, default=100)
    ap.add_argument("--partial_epochs", type=int, default=30)
    ap.add_argument("--finetune_epochs", type=int, default=30)
    ap.add_argument("--methods", nargs="+", default=["mae", "crossmae"])
    ap.add_argument("--mask_ratios", nargs="+", default=["0.25", "0.5", "0.75", "0.9"])
    ap.add_argument("--decoder_depths", nargs="+", default=["1", "2", "4", "8"])
    args = ap.parse_args()
    rows = {"speed": run_speed, "quality": run_quality, "curves": run_curves}[args.part](args)
    print(f"rows appended to {append_csv(rows)}")


if __name__ == "__main__":
    main()
