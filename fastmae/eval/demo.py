"""``fastmae demo-eval``: pretrain a tiny MAE on the embedded digits, then compare it with random init.

One command, offline, on CPU: pretrain (training split, labels unused) -> every registered protocol
with a demo row (linear probe, partial fine-tuning of the last block, full fine-tuning, k-NN on frozen
features), each for the MAE encoder and a randomly initialized one with the same recipe ->
a markdown table (``results.md``), attention diagnostics (MAE vs random vs
fine-tuned) and reconstructions.

``--method=crossmae`` pretrains the same encoder with CrossMAE's decoder instead (any
registered image method with an encoder-decoder model).

Example:
    fastmae demo-eval --output_dir=runs/demo_eval
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastmae.eval.data import load_digits_split
from fastmae.eval.models import DIGITS_ARCH
from fastmae.eval.pretrain_digits import pretrain, tiny_digits_model
from fastmae.flags import key, run_cli


@dataclass
class DemoConfig:
    preset: str = key("default", "named set of defaults; the values below are this preset's")
    output_dir: str = key("runs/demo_eval", "run folder (config, metrics, checkpoints, summary, pictures)")
    seed: int = key(0, "random seed (data order, masks, init)")
    # torch intra-op threads (0 = torch's default). One: 64-wide GEMMs gain nothing from a second
    # thread, and on a shared 2-core machine one thread ran a step ~3x faster than two (92 vs 263 ms).
    threads: int = key(1, "torch intra-op threads; 0 = torch's default")
    method: str = field(default="mae", metadata={
        "help": "pretraining method of the encoder (mae | crossmae): the decoder, masking and loss"})
    # tiny MAE (width 64, depth 4, patch 4, 16 px, grayscale)
    embed_dim: int = key(64, "encoder width of the demo's MAE")
    depth: int = key(4, "encoder blocks of the demo's MAE")
    num_heads: int = key(4, "encoder attention heads of the demo's MAE")
    decoder_dim: int = key(64, "decoder width")
    decoder_depth: int = key(2, "decoder blocks")
    norm_pix_loss: bool = key(False, "predict per-patch normalized pixels (the official recipe)")
    mask_ratio: float = key(0.75, "fraction of patches removed")
    # ~170 CPU s; 100 epochs lift the linear probe by 3 points, 300 by 7
    pretrain_epochs: int = key(300, "demo pretraining epochs")
    pretrain_batch: int = key(128, "demo pretraining batch size")
    pretrain_blr: float = key(1.5e-3, "demo pretraining base learning rate")
    # downstream epochs (0 skips that protocol)
    probe_epochs: int = key(100, "demo linear-probe epochs")
    partial_epochs: int = key(30, "demo partial fine-tuning epochs")
    finetune_epochs: int = key(30, "demo full fine-tuning epochs")
    knn: bool = field(default=True, metadata={"help": "the k-NN row (frozen features, k=20, T=0.07; nothing trains)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of the training split held out to choose the reported epoch (never the test split)"})
    analyze: bool = key(True, "also run the attention analysis")
    quiet: bool = key(True, "print only the result")

    def validate(self) -> None:
        from fastmae.methods.registry import get_method

        get_method(self.method)
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be positive, got {self.pretrain_epochs}")
        if min(self.probe_epochs, self.partial_epochs, self.finetune_epochs) < 0:
            raise ValueError("downstream epochs must be >= 0 (0 skips the protocol)")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


PRESETS = {
    "default": {},
    # Seconds, for smoke tests: the numbers mean nothing.
    "smoke": dict(pretrain_epochs=1, probe_epochs=2, partial_epochs=1, finetune_epochs=1, embed_dim=32, depth=2,
                  num_heads=2, decoder_dim=32, decoder_depth=1),
}


def run_demo(cfg: DemoConfig) -> dict:
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (e.g. a test process) is left as it was


def _run(cfg: DemoConfig) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    arch = dict(DIGITS_ARCH, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    split = load_digits_split(arch["img_size"], arch["in_chans"], seed=cfg.seed)

    mae_path = out / "mae_pretrained.pt"
    mae_sd, meta, pre = pretrain_on_digits(cfg, split, mae_path)
    print(f"pretrained {pre['steps']} steps in {pre['wall_s']:.1f}s, final loss {pre['losses'][-1]:.4f}", flush=True)

    rows = []
    for spec, name, kw in demo_protocols(cfg):
        row = {"protocol": name, "epochs": kw.get("epochs", "-")}
        for init, sd in (("random", None), ("mae", mae_sd)):
            tag = f"{init}_{name.split()[0]}"
            # The demo's own sub-run of this invocation: a rerun of the demo replaces it (the encoder is new).
            shutil.rmtree(out / tag, ignore_errors=True)
            # The architecture is spelled out so random init builds the very same encoder.
            ecfg = spec.config.from_flat(**kw, output_dir=str(out / tag), seed=cfg.seed, quiet=cfg.quiet, ckpt=init,
                       embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
                       val_fraction=cfg.val_fraction, progress=False)
            cpu0 = time.process_time()
            r = spec.run(ecfg, split=split, source_sd=sd, source_meta=meta)
            row[f"{init}_cpu_s"] = time.process_time() - cpu0
            row[init] = r["top1"]
            row[f"{init}_last"] = r["top1_last"]
            row[f"{init}_epoch"] = r["epoch"]
            row[f"{init}_s"] = r["wall_s"]
            label = cfg.method if init == "mae" else init  # "mae" keys the pretrained encoder, whatever its method
            print(f"{name:32s} {label:8s} top-1 {r['top1']:.4f} ({r['reported']}), last epoch {r['top1_last']:.4f} "
                  f"({r['wall_s']:.1f}s)", flush=True)
        rows.append(row)

    analyze_s = 0.0
    if cfg.analyze:
        from fastmae.eval.analyze import AnalyzeConfig, analyze
        from fastmae.eval.visualize import VisualizeConfig, visualize

        t0 = time.perf_counter()
        ckpts, labels = [str(mae_path), "random"], ["mae", "random"]
        ft = out / "mae_full" / "checkpoint-last.pt"
        if ft.is_file():
            ckpts.append(str(ft))
            labels.append("mae+finetuned")
        analyze(AnalyzeConfig(ckpts=",".join(ckpts), labels=",".join(labels), output_dir=str(out / "analyze"),
                              seed=cfg.seed, num_heads=cfg.num_heads))
        visualize(VisualizeConfig(ckpt=str(mae_path), output=str(out / "reconstructions.png"), seed=cfg.seed))
        analyze_s = time.perf_counter() - t0

    total = time.perf_counter() - t_start
    summary = {"rows": rows, "pretrain_s": pre["wall_s"], "pretrain_cpu_s": pre["cpu_s"], "pretrain_loss": pre["losses"],
               "analyze_s": analyze_s, "total_s": total, "total_cpu_s": time.process_time() - cpu_start,
               "load_avg_1min": _loadavg(), "threads": torch.get_num_threads(), "n_train": len(split.train_y),
               "n_test": len(split.test_y)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_table(cfg, summary)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return summary


def demo_protocols(cfg: DemoConfig) -> list[tuple]:
    """(spec, row label, config keywords) of each registered protocol the demo runs, in registry order: a
    protocol's epochs come from its ``DemoConfig`` key (0 skips it); one that does not train is on while the
    ``DemoConfig`` key of its name is true."""
    from fastmae.eval.protocols import get_protocol, list_protocols

    out = []
    for spec in map(get_protocol, list_protocols()):
        if spec.demo is None:
            continue
        name, epochs_key, overrides = spec.demo
        kw = dict(overrides)
        if epochs_key:
            kw["epochs"] = getattr(cfg, epochs_key)
        if not (kw["epochs"] if epochs_key else getattr(cfg, spec.name, True)):
            continue
        out.append((spec, name, kw))
    return out


def pretrain_on_digits(cfg: DemoConfig, split, path: Path) -> tuple[dict, dict, dict]:
    """The demo's tiny MAE pretrained on the digits' training split (labels unused), saved to ``path``.

    -> (state dict, checkpoint metadata, {'losses', 'wall_s', 'steps', 'cpu_s'}).
    """
    arch = dict(DIGITS_ARCH, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    torch.manual_seed(cfg.seed)
    mae = tiny_digits_model(arch, cfg.decoder_dim, cfg.decoder_depth, cfg.norm_pix_loss, split.mean, split.std,
                            method=cfg.method)
    cpu0 = time.process_time()
    pre = pretrain(mae, split.train_x, epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch, blr=cfg.pretrain_blr,
                   mask_ratio=cfg.mask_ratio, seed=cfg.seed, log_every=0 if cfg.quiet else 10)
    pre["cpu_s"] = time.process_time() - cpu0
    meta = {"arch": arch, "pixel_mean": list(split.mean), "pixel_std": list(split.std),
            "decoder": {"decoder_embed_dim": cfg.decoder_dim, "decoder_depth": cfg.decoder_depth,
                        "decoder_num_heads": 4, "norm_pix_loss": cfg.norm_pix_loss},
            "method": cfg.method, "config": asdict(cfg)}
    torch.save({"model": mae.state_dict(), **meta}, path)
    return mae.state_dict(), meta, pre


def format_table(cfg: DemoConfig, s: dict) -> str:
    lines = [
        f"Digits (scikit-learn, 16 px grayscale, {s['n_train']} train / {s['n_test']} held-out, 10 classes), "
        f"ViT width {cfg.embed_dim}, depth {cfg.depth}, patch 4; {cfg.method} pretrained {cfg.pretrain_epochs} epochs "
        f"(mask {cfg.mask_ratio}) on the training split. Top-1 on the held-out test split at the epoch chosen on a "
        f"validation split carved from the training split ({cfg.val_fraction:.0%}); in parentheses the last epoch's. "
        "The test split never picks anything.",
        "",
        f"| protocol | epochs | random init | {cfg.method} | lift (points) |",
        "|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['epochs']} | {r['random']:.3f} ({r['random_last']:.3f}) "
            f"| {r['mae']:.3f} ({r['mae_last']:.3f}) | {100 * (r['mae'] - r['random']):+.1f} |")
    per = ", ".join(f"{r['protocol'].split()[0]} {r['random_s'] + r['mae_s']:.0f}s / "
                    f"{r['random_cpu_s'] + r['mae_cpu_s']:.0f}s" for r in s["rows"])
    lines += ["", f"Wall / CPU time: {s['total_s']:.0f}s / {s['total_cpu_s']:.0f}s total on {platform.machine()} with "
                  f"{s['threads']} torch thread(s), 1-min load average {s['load_avg_1min']} at the end "
                  f"(pretrain {s['pretrain_s']:.0f}s / {s['pretrain_cpu_s']:.0f}s; {per}; "
                  f"analyze + visualize {s['analyze_s']:.0f}s wall)."]
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _body(cfg: DemoConfig) -> int:
    run_demo(cfg)
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, DemoConfig, PRESETS, _body, "demo-eval", __doc__)
