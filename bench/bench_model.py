"""One fp32 forward+backward of fastmae's MAE vs transformers' ViTMAE at equal config, interleaved.

    python bench/bench_model.py                 # ViT-B/16 batch 8 and a tiny config, 224 px, mask 0.75, norm-pix
    python bench/bench_model.py --configs tiny --repeats 9

Both models get the same weights (through fastmae.convert) and the same noise;
times are medians over ``--repeats`` interleaved rounds after warm-up.
Prints a markdown table and appends rows to bench/results/<bench>.csv.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _harness import append_csv, hf_vitmae_step, interleaved, median_ms, stamp

from fastmae import mae_vit_base_patch16, mae_vit_tiny
from fastmae.flags import underscores

CONFIGS = {
    "vit_b16": lambda: mae_vit_base_patch16(norm_pix_loss=True),
    "tiny": lambda: mae_vit_tiny(img_size=224, patch_size=16, norm_pix_loss=True),
}


def run(name: str, batch: int, warmup: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    ours = CONFIGS[name]().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    noise = torch.rand(batch, ours.patch_embed.num_patches, device=device)
    step_hf = hf_vitmae_step(ours, x, noise, adamw=False)

    def step_ours():
        loss = ours(x, 0.75, noise)[0]
        loss.backward()

    times = interleaved({"fastmae": step_ours, "hf": step_hf}, device, warmup, repeats)
    ms_ours, ms_hf = median_ms(times["fastmae"]), median_ms(times["hf"])
    return {"bench": "model_fwd_bwd_fp32", "config": name, "batch": batch, "fastmae_ms": round(ms_ours, 1),
            "hf_ms": round(ms_hf, 1), "fastmae_img_s": round(batch / ms_ours * 1e3, 1),
            "hf_img_s": round(batch / ms_hf * 1e3, 1), "speedup_vs_hf": round(ms_hf / ms_ours, 3), **stamp(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["vit_b16", "tiny"], choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(underscores(sys.argv[1:]))  # --img-size = --img_size, as in fastmae
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    rows = [run(c, args.batch, args.warmup, args.repeats, device) for c in args.configs]
    env = f"{rows[0]['device']}, torch {rows[0]['torch']}"
    print(f"\nfp32 forward+backward, 224 px, mask 0.75, norm-pix, batch {args.batch}, {env}\n")
    print("| config | fastmae ms | HF ViTMAE ms | fastmae img/s | HF img/s | speedup vs HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r["config"], r["fastmae_ms"], r["hf_ms"], r["fastmae_img_s"], r["hf_img_s"], f"{r['speedup_vs_hf']}x"]
        print("| " + " | ".join(map(str, cells)) + " |")
    append_csv(rows)


if __name__ == "__main__":
    main()
