"""Fine-tuning step img/s: fastmae's classifier vs timm's VisionTransformer, same recipe, eager vs compiled, fp32 vs bf16.

    python bench/bench_finetune.py                                   # ViT-B/16, 224 px, batch 8 (slow on a CPU)
    python bench/bench_finetune.py --model small --img 96 --modes eager-fp32 eager-bf16 compiled-fp32

One step is what ``fastmae finetune --preset=official_base`` runs per batch:
mixup/cutmix (timm ``Mixup``, 0.8 / 1.0, smoothing 0.1) -> autocast forward
(global pool, fc_norm, drop path 0.1) -> timm ``SoftTargetCrossEntropy`` ->
backward -> fused AdamW over layer-decay groups (0.65). timm's model gets the
same weights (the parameter names are the same) and the same optimizer groups.
Both contenders of a mode are timed interleaved in the same run (medians of
``--repeats`` rounds after warm-up; compiled modes compile during warm-up).
Prints a markdown table and appends rows to bench/results/finetune_step.csv.
"""

from __future__ import annotations

import argparse

import torch
from _harness import append_csv, interleaved, median_ms, stamp

from fastmae.eval.optim import adamw_layer_decay
from fastmae.eval.protocol import Classifier
from fastmae.models.vit import VisionTransformer

SIZES = {"base": dict(embed_dim=768, depth=12, num_heads=12), "small": dict(embed_dim=384, depth=12, num_heads=6),
         "tiny": dict(embed_dim=192, depth=12, num_heads=3)}
MODES = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")


def build(size: str, img: int, device: torch.device):
    import timm.models.vision_transformer as tvit

    torch.manual_seed(0)
    arch = dict(img_size=img, patch_size=16, num_classes=1000, **SIZES[size])
    ours = VisionTransformer(**arch, global_pool=True, drop_path_rate=0.1, learn_pos_embed=True)
    theirs = tvit.VisionTransformer(**arch, global_pool="avg", drop_path_rate=0.1)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"timm ViT and fastmae ViT differ: missing {missing}, unexpected {unexpected}")
    return Classifier(ours, 0).to(device), theirs.to(device)


def step_fn(model, device: torch.device, amp_dtype: torch.dtype, compiled: bool, batch: int, img: int):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    target_model = model.vit if isinstance(model, Classifier) else model
    opt = adamw_layer_decay(target_model, 0.05, 0.65, (0.9, 0.999), device)
    for g in opt.param_groups:
        g["lr"] = 1e-4 * g["lr_scale"]
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    criterion = SoftTargetCrossEntropy()
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    model.train()

    def step():
        xb, yb = mixup(x, y)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = criterion(forward(xb).float(), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(size: str, img: int, batch: int, mode: str, warmup: int, repeats: int, device: torch.device) -> dict:
    ours, theirs = build(size, img, device)
    compiled, dtype = mode.startswith("compiled"), torch.bfloat16 if mode.endswith("bf16") else torch.float32
    fns = {"fastmae": step_fn(ours, device, dtype, compiled, batch, img),
           "timm": step_fn(theirs, device, dtype, compiled, batch, img)}
    times = interleaved(fns, device, warmup, repeats)
    ms_ours, ms_timm = median_ms(times["fastmae"]), median_ms(times["timm"])
    return {"bench": "finetune_step", "model": f"vit_{size}_patch16", "img": img, "batch": batch, "mode": mode,
            "fastmae_ms": round(ms_ours, 1), "timm_ms": round(ms_timm, 1),
            "fastmae_img_s": round(batch / ms_ours * 1e3, 2), "timm_img_s": round(batch / ms_timm * 1e3, 2),
            "speedup_vs_timm": round(ms_timm / ms_ours, 3), **stamp(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base", choices=sorted(SIZES))
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    rows = [run(args.model, args.img, args.batch, m, args.warmup, args.repeats, device) for m in args.modes]
    base = {r["mode"]: r for r in rows}.get("eager-fp32")
    print(f"| vit_{args.model}_patch16, {args.img} px, batch {args.batch}, {rows[0]['device']} | fastmae img/s | "
          f"timm img/s | fastmae / timm | fastmae vs its eager fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['fastmae_img_s'] / base['fastmae_img_s']:.2f}x" if base else "n/a"
        print(f"| {r['mode']} | {r['fastmae_img_s']} | {r['timm_img_s']} | {r['speedup_vs_timm']:.2f}x | {rel} |")
    print(f"rows appended to {append_csv(rows)}")


if __name__ == "__main__":
    main()
