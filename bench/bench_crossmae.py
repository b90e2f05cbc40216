"""CrossMAE vs MAE in one run: training-step time, FLOPs per image, and representation quality on digits.

    python bench/bench_crossmae.py speed                 # tiny (64 px) and ViT-B (224 px), two batches each: fp32, bf16
    python bench/bench_crossmae.py quality               # digits: pretrain MAE and CrossMAE, probe / partial / full vs random
    python bench/bench_crossmae.py curves                # digits: linear probe vs mask ratio and vs decoder depth (PNG)

speed: the training step fastmae pretrain runs (fastmae.engine.step.train_step: autocast forward, backward,
gradient norm, fused AdamW) for MAE, CrossMAE with the paper's ViT-B decoder (512 x 12, feature fusion,
prediction ratio 0.25) and CrossMAE with MAE's decoder shape (512 x 8, no fusion), at two batch sizes,
rounds interleaved, medians after warm-up. Ratios are MAE's time over the contender's: of the whole step at
the larger batch, and of the marginal time per image (the slope between the two batches; per-step costs over
the parameters, which a GPU batch of 256 amortizes, drop out). FLOPs per image are counted by
torch.utils.flop_counter.FlopCounterMode over one forward+backward with eager attention (the CPU SDPA
kernel is not counted).

quality and curves: the digits demo's recipe (fastmae.eval: 16 px grayscale, width 64, depth 4, patch 4;
pretraining on the training split, labels unused; the MAE protocols on the held-out split), one torch
thread. Markdown tables to stdout, rows to bench/results/bench_crossmae.csv, PNGs to bench/figures/.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _harness import append_csv, interleaved, make_train_step, median_ms, stamp

from fastmae.layers import set_attention_backend
from fastmae.models import crossmae_vit_base_patch16, crossmae_vit_tiny, mae_vit_base_patch16, mae_vit_tiny

FIGURES_DIR = Path(__file__).with_name("figures")  # committed pictures (bench/results/ is kept out of git)

# ---- speed and FLOPs -------------------------------------------------------------------------------------------

SPEED_CASES = {
    # name: (img_size, (batch lo, batch hi), {contender: factory})
    "tiny": (64, (8, 32), {
        "MAE": lambda: mae_vit_tiny(norm_pix_loss=True),
        "CrossMAE": lambda: crossmae_vit_tiny(norm_pix_loss=True),
        "CrossMAE no fusion": lambda: crossmae_vit_tiny(norm_pix_loss=True, feature_fusion=False),
    }),
    "ViT-B/16": (224, (4, 12), {
        "MAE": lambda: mae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE": lambda: crossmae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE dec 8, no fusion": lambda: crossmae_vit_base_patch16(norm_pix_loss=True, decoder_depth=8,
                                                                       feature_fusion=False),
    }),
    # the paper recipe's two parts apart (feature fusion, 12 vs 8 decoder blocks): --cases "ViT-B/16 parts"
    "ViT-B/16 parts": (224, (4, 12), {
        "MAE": lambda: mae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE fusion, dec 12 (paper)": lambda: crossmae_vit_base_patch16(norm_pix_loss=True),
        "CrossMAE no fusion, dec 12": lambda: crossmae_vit_base_patch16(norm_pix_loss=True, feature_fusion=False),
        "CrossMAE fusion, dec 8": lambda: crossmae_vit_base_patch16(norm_pix_loss=True, decoder_depth=8),
        "CrossMAE no fusion, dec 8": lambda: crossmae_vit_base_patch16(norm_pix_loss=True, decoder_depth=8,
                                                                       feature_fusion=False),
    }),
}
DEFAULT_CASES = ("tiny", "ViT-B/16")


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
    """Each contender's step at two batch sizes (interleaved rounds per batch): the step ratio at the larger batch, and
    the marginal time per image (slope between the two), which leaves out per-step costs that do not grow with the
    batch (the optimizer, gradient norm and weight casts over every parameter) and so tells what large batches see."""
    device = torch.device("cpu")
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    rows = []
    lines = ["| model | precision | contender | params (M) | ms/step (batch lo / hi) | MAE / contender, step at hi "
             "| marginal ms/img | MAE / contender, marginal | train GFLOP/img | MAE / contender FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, (img, batches, factories) in SPEED_CASES.items():
        if case not in (args.cases or DEFAULT_CASES):
            continue
        lo, hi = args.batches or batches
        torch.manual_seed(0)
        models = {name: f() for name, f in factories.items()}
        flops = {name: train_flops_per_image(m, torch.randn(2, 3, img, img)) for name, m in models.items()}
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if precision not in args.precisions:
                continue
            ms = {}
            for b in (lo, hi):
                x = torch.randn(b, 3, img, img)
                steps = {}
                for name, m in models.items():
                    m = copy.deepcopy(m)
                    steps[name] = make_train_step(m, device, dtype, m, x, 0.75)
                times = interleaved(steps, device, args.warmup, args.repeats)
                ms[b] = {name: median_ms(t) for name, t in times.items()}
                del steps
            slope = {name: (ms[hi][name] - ms[lo][name]) / (hi - lo) for name in models}
            for name in models:
                n_params = sum(p.numel() for p in models[name].parameters() if p.requires_grad) / 1e6
                step_ratio, slope_ratio = ms[hi]["MAE"] / ms[hi][name], slope["MAE"] / slope[name]
                rows.append({"bench": "bench_crossmae", "part": "speed", "case": case, "precision": precision,
                             "contender": name, "batch": hi, "batch_lo": lo, "median_ms": round(ms[hi][name], 2),
                             "median_ms_lo": round(ms[lo][name], 2), "speedup_vs_mae": round(step_ratio, 3),
                             "marginal_ms_per_img": round(slope[name], 2), "marginal_speedup_vs_mae": round(slope_ratio, 3),
                             "params_m": round(n_params, 2), "train_gflop_per_img": round(flops[name] / 1e9, 3),
                             "flops_ratio_vs_mae": round(flops["MAE"] / flops[name], 3), **stamp(device)})
                lines.append(f"| {case} | {precision} | {name} | {n_params:.1f} | {ms[lo][name]:.0f} / {ms[hi][name]:.0f} "
                             f"(b {lo} / {hi}) | {step_ratio:.2f}x | {slope[name]:.1f} | {slope_ratio:.2f}x "
                             f"| {flops[name] / 1e9:.2f} | {flops['MAE'] / flops[name]:.2f}x |")
            print("\n".join(lines[-len(models):]), flush=True)
    print("\n" + "\n".join(lines))
    return rows


# ---- digits quality ------------------------------------------------------------------------------------------------


def digits_model(method: str, arch: dict, split, decoder_depth: int = 2, **method_kwargs):
    from fastmae.eval.pretrain_digits import tiny_digits_model

    return tiny_digits_model(arch, 64, decoder_depth, False, split.mean, split.std, method=method, **method_kwargs)


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
        result[name] = r["top1"]  # the protocol's headline: the last epoch's test top-1 (no best-on-test pick)
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
                yield name, cls.from_flat(**kw, output_dir=str(out / name.split()[0]), seed=seed, quiet=True, ckpt=init,
                                embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"])

    return make


QUALITY_CONTENDERS = {
    # tag: (label, method, constructor keywords, pretraining epochs: "same" as MAE's, or "equal_flops": MAE's epochs
    #       times MAE's training FLOPs per image over the contender's, i.e. the same pretraining compute)
    "mae": ("MAE", "mae", {}, "same"),
    "crossmae": ("CrossMAE (pred 0.25, fusion)", "crossmae", dict(prediction_ratio=0.25, feature_fusion=True), "same"),
    "crossmae_all": ("CrossMAE (pred 0.75 = all masked, fusion)", "crossmae",
                     dict(prediction_ratio=0.75, feature_fusion=True), "same"),
    "crossmae_nofusion": ("CrossMAE (pred 0.25, no fusion)", "crossmae", dict(prediction_ratio=0.25, feature_fusion=False),
                          "same"),
    "crossmae_equal_flops": ("CrossMAE (pred 0.25, fusion), MAE's pretraining FLOPs", "crossmae",
                             dict(prediction_ratio=0.25, feature_fusion=True), "equal_flops"),
}
PROTOCOL_NAMES = ["linear probe", "partial fine-tune", "full fine-tune"]


def run_quality(args) -> list[dict]:
    """Every (seed, contender) once: its result is kept in OUTPUT/seed<S>/<tag>.json, so a rerun (or a second
    process on other seeds) only adds what is missing; the table is over every seed found for the contenders."""
    import statistics

    from fastmae.eval.data import load_digits_split
    from fastmae.eval.models import DIGITS_ARCH
    from fastmae.eval.protocol import run_eval

    torch.set_num_threads(1)
    arch = dict(DIGITS_ARCH)
    split = load_digits_split(arch["img_size"], arch["in_chans"], seed=0)  # one split: seeds vary the runs only
    out = Path(args.output_dir)
    epochs = {"probe": args.probe_epochs, "partial": args.partial_epochs, "full": args.finetune_epochs}
    meta = {"arch": arch, "pixel_mean": list(split.mean), "pixel_std": list(split.std)}
    tags = ["random", *args.contenders]
    for seed in args.seeds:
        for tag in tags:
            path = out / f"seed{seed}" / f"{tag}.json"
            if path.is_file():
                continue
            run_dir = out / f"seed{seed}" / tag
            if tag == "random":
                result = {name: run_eval(ecfg, split=split, source_sd=None, source_meta=meta)["top1"]
                          for name, ecfg in protocol_configs(arch, epochs, "random", seed)(run_dir)}
            else:
                _, method, kw, budget = QUALITY_CONTENDERS[tag]
                torch.manual_seed(seed)
                model = digits_model(method, arch, split, **kw)
                pre_epochs = args.pretrain_epochs
                if budget == "equal_flops":
                    x = split.train_x[:128]
                    ratio = train_flops_per_image(digits_model("mae", arch, split), x) / train_flops_per_image(model, x)
                    pre_epochs = round(args.pretrain_epochs * ratio)
                result = pretrain_and_eval(model, arch, split, run_dir, pre_epochs, 0.75,
                                           protocol_configs(arch, epochs, "pretrained", seed), seed=seed)
                result["pretrain_epochs"] = pre_epochs
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"seed {seed} {tag}: {result}", flush=True)
    found = {tag: [json.loads(p.read_text()) for p in sorted(out.glob(f"seed*/{tag}.json"))] for tag in tags}
    names = [n for n in PROTOCOL_NAMES if epochs[{"linear": "probe", "partial": "partial", "full": "full"}[n.split()[0]]]]
    lines = [f"Digits (16 px, width 64, depth 4, patch 4), pretraining {args.pretrain_epochs} epochs at mask 0.75; "
             f"probe {epochs['probe']} / partial {epochs['partial']} / full {epochs['full']} epochs; held-out top-1 "
             "after the last epoch, mean +- sample std over seeds (pretraining and protocol seeds; one split).", "",
             "| encoder | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows = []
    for tag, results in found.items():
        if not results:
            continue
        label = "random init" if tag == "random" else QUALITY_CONTENDERS[tag][0]
        other_epochs = sorted({r["pretrain_epochs"] for r in results if r.get("pretrain_epochs", args.pretrain_epochs)
                               != args.pretrain_epochs})
        if other_epochs:
            label += f" = {', '.join(map(str, other_epochs))} epochs"
        cells = []
        for n in names:
            vals = [r[n] for r in results]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} +- {sd:.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        lines.append(f"| {label} | {len(results)} | " + " | ".join(cells) + " |")
        rows.append({"bench": "bench_crossmae", "part": "quality", "contender": label, "seeds": len(results),
                     "pretrain_epochs": args.pretrain_epochs,
                     **{n: round(statistics.mean(r[n] for r in results), 4) for n in names},
                     **stamp(torch.device("cpu"))})
    print("\n" + "\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(found, indent=2) + "\n")
    return rows


def _reuse_default_point(out: Path, method: str, key: str, sweeps: dict) -> None:
    """The demo's default point (mask 0.75, decoder depth 2) sits on both curves: once it is done in one sweep,
    the other sweep's folder for it is a copy (the same configuration, seed and split), not a second run."""
    import shutil

    from fastmae.eval.demo import DemoConfig

    default = {k: str(getattr(DemoConfig, k)) for k in sweeps}
    target = out / f"{method}_{key}" / f"{key}={default[key]}"
    if default[key] not in sweeps[key] or target.exists():
        return
    for other in sweeps:
        source = out / f"{method}_{other}" / f"{other}={default[other]}"
        if other != key and all((source / p / "results.json").is_file() for p in ("linprobe", "finetune")):
            shutil.copytree(source, target)
            return


def run_curves(args) -> list[dict]:
    """``fastmae sweep`` per (method, key) on the digits demo, then one PNG per key with every method's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmae.eval.sweep import SweepConfig, run_sweep

    out = Path(args.output_dir)
    sweeps = {"mask_ratio": args.mask_ratios, "decoder_depth": args.decoder_depths}
    quiet = ["--quiet=true", "--progress=false"]
    per_protocol = {"linprobe": [f"--epochs={args.probe_epochs}", *quiet],
                    "finetune": [f"--epochs={args.finetune_epochs}", *quiet]}
    names = {"mae": "MAE", "crossmae": "CrossMAE (pred 0.25, fusion)"}
    rows, curves = [], {}
    for key, values in sweeps.items():
        for method in args.methods:
            _reuse_default_point(out, method, key, sweeps)
            # a finished point is not rerun: one process per method can fill the folders side by side
            cfg = SweepConfig(protocol="both", values=f"{key}={','.join(values)}", output_dir=str(out / f"{method}_{key}"),
                              pretrain_epochs=args.pretrain_epochs, method=method)
            for r in run_sweep(cfg, per_protocol):
                curves.setdefault((key, method, r["protocol"]), []).append((float(r[key]), r["top1"]))
                rows.append({"bench": "bench_crossmae", "part": "curves", "sweep": key, "value": r[key],
                             "contender": method, "protocol": r["protocol"], "pretrain_epochs": args.pretrain_epochs,
                             "top1": r["top1"], **stamp(torch.device("cpu"))})
    if args.plot_only_when_complete and set(args.methods) != set(names):
        return rows
    figures = Path(args.figures_dir)
    figures.mkdir(parents=True, exist_ok=True)
    for key in sweeps:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
        for j, method in enumerate(args.methods):
            for protocol, style in (("linprobe", "-"), ("finetune", "--")):
                pts = curves[(key, method, protocol)]
                ax.plot([x for x, _ in pts], [100 * y for _, y in pts], style, marker="o", color=f"C{j}",
                        label=f"{names.get(method, method)}, {'linear probe' if protocol == 'linprobe' else 'full fine-tune'}")
        ax.set_xlabel(key.replace("_", " ") + (" (decoder blocks)" if key == "decoder_depth" else " (share of patches removed)"))
        ax.set_ylabel("held-out digits top-1 (%), last epoch")
        ax.set_xticks([float(v) for v in sweeps[key]])
        ax.set_title(f"digits, {args.pretrain_epochs} pretraining epochs, seed 0 (seed-to-seed std of the probe ~1 point)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = figures / f"crossmae_digits_vs_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("speed", "quality", "curves"))
    ap.add_argument("--cases", nargs="*", default=[],
                    help=f"speed: any of {', '.join(SPEED_CASES)} (default: {', '.join(DEFAULT_CASES)})")
    ap.add_argument("--batches", nargs=2, type=int, default=None, metavar=("LO", "HI"),
                    help="speed: the two batch sizes of every case (default tiny 8 32, ViT-B 4 12)")
    ap.add_argument("--threads", type=int, default=1, help="speed: torch intra-op threads")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="speed")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output_dir", default="runs/bench_crossmae")
    ap.add_argument("--pretrain_epochs", type=int, default=300)
    ap.add_argument("--probe_epochs", type=int, default=100)
    ap.add_argument("--partial_epochs", type=int, default=30)
    ap.add_argument("--finetune_epochs", type=int, default=30)
    ap.add_argument("--methods", nargs="+", default=["mae", "crossmae"], help="curves: methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="quality: seeds")
    ap.add_argument("--contenders", nargs="+", default=["mae", "crossmae"], choices=list(QUALITY_CONTENDERS),
                    help="quality: pretrained encoders (random init always runs)")
    ap.add_argument("--mask_ratios", nargs="+", default=["0.5", "0.75", "0.9"])
    ap.add_argument("--decoder_depths", nargs="+", default=["1", "2", "4"])
    ap.add_argument("--plot_only_when_complete", action="store_true",
                    help="curves: skip the PNGs unless every method ran (for one process per method)")
    ap.add_argument("--figures_dir", default=str(FIGURES_DIR), help="curves: where the PNGs go")
    args = ap.parse_args(argv)
    rows = {"speed": run_speed, "quality": run_quality, "curves": run_curves}[args.part](args)
    print(f"rows appended to {append_csv(rows)}")


if __name__ == "__main__":
    main()
