"""Training step (forward, backward, AdamW) of SimMIM and VideoMAE against an official-style eager twin in the same run.

    python bench/bench_step_family.py                                  # tiny models, CPU
    python bench/bench_step_family.py --size base --batch 32 --device cuda

The twins are the papers' code paths, written here on the same weights: SimMIM with a full-image Conv2d patch
embedding, a mask-token lerp, a 1x1 conv + PixelShuffle head and the pixel-mask L1 loss; VideoMAE with a Conv3d
over the whole clip, visible tokens gathered after embedding, and the target built by a tubelet rearrange.
fastmae's models embed patches as a GEMM on patchify+gather output (only visible tubelets for VideoMAE), use a
Linear head, and compute the loss from the images with the fused-loss op (the Triton kernels on CUDA).
Every contender runs ``fastmae.engine.step.train_step`` (the step of ``fastmae pretrain``).
Rounds are interleaved and medians taken after warm-up; a Markdown table goes to stdout, rows to bench/results/family_step.csv.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys

import torch
import torch.nn.functional as F
from _harness import append_csv, interleaved, make_train_step, median_ms, stamp

from fastmae.flags import underscores
from fastmae.methods.reference_family import simmim_l1_loss, simmim_pixel_mask, videomae_loss
from fastmae.methods.simmim import simmim_vit_base_patch16, simmim_vit_tiny
from fastmae.methods.videomae import videomae_vit_base_patch16, videomae_vit_tiny


def simmim_official_loss(m, x, noise, ratio):
    """SimMIM's forward on fastmae's SimMIM weights (Conv2d embed, lerp with the mask token, conv head + PixelShuffle)."""
    N, C, H, W = x.shape
    p, s = m.patch_size, m.mask_patch_size
    cells = H // s
    n = int(-(-cells * cells * ratio // 1))
    cell_mask = torch.zeros_like(noise).scatter_(1, torch.argsort(noise, 1)[:, :n], 1.0).reshape(N, cells, cells)
    tok_mask = cell_mask.repeat_interleave(s // p, 1).repeat_interleave(s // p, 2).flatten(1)
    z = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    w = tok_mask.unsqueeze(-1).type_as(z)
    z = z * (1 - w) + m.mask_token * w
    z = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(N, -1, -1), z + m.pos_embed[:, 1:]], dim=1)
    for blk in m.blocks:
        z = blk(z)
    z = m.norm(z)[:, 1:].transpose(1, 2).reshape(N, -1, H // p, W // p)
    D = z.shape[1]
    # conv channel c*p*p + i*p + j <-> Linear row (i*p + j)*C + c
    wc = m.decoder_pred.weight.reshape(p * p, C, D).transpose(0, 1).reshape(C * p * p, D, 1, 1)
    bc = m.decoder_pred.bias.reshape(p * p, C).t().reshape(-1)
    rec = F.pixel_shuffle(F.conv2d(z, wc, bc), p)
    return simmim_l1_loss(rec, x, simmim_pixel_mask(cell_mask, s), eps=1e-5)


def videomae_official_loss(m, v, noise, ratio):
    """VideoMAE's forward on fastmae's weights (Conv3d over the clip, then gather visible tokens; rearranged target)."""
    N = v.shape[0]
    t, p, C = m.tubelet_size, m.patch_size, m.in_chans
    _, _, ids_keep, ids_masked, _ = m.tubelet_mask(v, ratio, noise)
    z = F.conv3d(v, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=(t, p, p)).flatten(2).transpose(1, 2)
    z = z + m.pos_embed
    D = z.shape[-1]
    z = torch.gather(z, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    for blk in m.blocks:
        z = blk(z)
    z = m.decoder_embed(m.norm(z))
    Dd = z.shape[-1]
    pos = m.decoder_pos_embed.expand(N, -1, -1)
    z = torch.cat([z + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd)),
                   m.mask_token + torch.gather(pos, 1, ids_masked.unsqueeze(-1).expand(-1, -1, Dd))], dim=1)
    for blk in m.decoder_blocks:
        z = blk(z)
    # The head's rows reordered from fastmae's (p, q, t, c) to VideoMAE's (t, p, q, c).
    wh = m.decoder_pred.weight.reshape(p, p, t, C, Dd).permute(2, 0, 1, 3, 4).reshape(-1, Dd)
    bh = m.decoder_pred.bias.reshape(p, p, t, C).permute(2, 0, 1, 3).reshape(-1)
    pred = F.linear(m.decoder_norm(z[:, -ids_masked.shape[1]:]), wh, bh)
    return videomae_loss(pred, v, ids_masked, t, p, m.target_norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--video_batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(underscores(sys.argv[1:]))  # --img-size = --img_size, as in fastmae
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    sim = (simmim_vit_tiny if args.size == "tiny" else simmim_vit_base_patch16)().to(device)
    vid = (videomae_vit_tiny if args.size == "tiny" else videomae_vit_base_patch16)().to(device)
    S, B, VB = sim.patch_embed.img_size[0], args.batch, args.video_batch
    x = torch.randn(B, 3, S, S, device=device)
    sim_noise = torch.rand(B, (S // sim.mask_patch_size) ** 2, device=device)
    v = torch.randn(VB, 3, vid.num_frames, vid.img_size, vid.img_size, device=device)
    vid_noise = torch.rand(VB, vid.grid_size[1] * vid.grid_size[2], device=device)

    with torch.no_grad():  # the twins compute the same loss (sanity check before timing)
        a, b = sim(x, 0.6, sim_noise)[0], simmim_official_loss(sim, x, sim_noise, 0.6)
        c, d = vid(v, 0.9, vid_noise)[0], videomae_official_loss(vid, v, vid_noise, 0.9)
    assert torch.allclose(a, b, rtol=1e-4) and torch.allclose(c, d, rtol=1e-4), (a, b, c, d)

    steps, meta = {}, {}
    for prec in args.precisions:
        amp = {"fp32": torch.float32, "bf16": torch.bfloat16}[prec]
        s_off, s_ours, v_off, v_ours = (copy.deepcopy(m) for m in (sim, sim, vid, vid))
        steps[f"simmim_official_{prec}"] = make_train_step(
            s_off, device, amp, lambda b, mask_ratio, m=s_off: (simmim_official_loss(m, b, sim_noise, mask_ratio),), x, 0.6)
        steps[f"simmim_fastmae_{prec}"] = make_train_step(s_ours, device, amp, functools.partial(s_ours, noise=sim_noise), x, 0.6)
        steps[f"videomae_official_{prec}"] = make_train_step(
            v_off, device, amp, lambda b, mask_ratio, m=v_off: (videomae_official_loss(m, b, vid_noise, mask_ratio),), v, 0.9)
        steps[f"videomae_fastmae_{prec}"] = make_train_step(
            v_ours, device, amp, functools.partial(v_ours, noise=vid_noise), v, 0.9)
        for k in list(steps)[-4:]:
            meta[k] = (k.split("_")[0], k.split("_")[1], prec)
    times = interleaved(steps, device, args.warmup, args.repeats)
    env = stamp(device)
    rows = []
    for name, ts in times.items():
        method, impl, prec = meta[name]
        ms = median_ms(ts)
        ref = median_ms(times[f"{method}_official_{prec}"])
        n = B if method == "simmim" else VB
        rows.append({"bench": "family_step", "model": f"{method}_{args.size}", "batch": n, "mode": f"{impl}_{prec}",
                     "ms": round(ms, 1), "samples_s": round(n / ms * 1e3, 2), "vs_official": round(ref / ms, 3), **env})
    print(f"\nfamily training step ({args.size}), SimMIM batch {B} at {S}px, VideoMAE batch {VB} x {vid.num_frames} frames "
          f"at {vid.img_size}px, {env['device']}, torch {env['torch']}\n")
    print("| model | impl | ms/step | samples/s | speed vs official-style eager (same precision) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['ms']} | {r['samples_s']} | {r['vs_official']}x |")
    append_csv(rows)


if __name__ == "__main__":
    main()
