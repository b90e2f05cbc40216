"""MAE pretraining, top to bottom: config -> data -> model -> compile -> step loop -> log/checkpoint.

``python train.py [--key=value ...]`` and ``fastmae pretrain`` both run :func:`main`.
With no arguments it pretrains a tiny MAE on the embedded demo set (photos that
ship inside installed packages) on the CPU in a few minutes.

The step never synchronizes with the host: loss, grad norm and the bad-step
counters stay on the device and are read every ``log_every`` steps; a
non-finite loss or gradient skips the update inside the fused AdamW kernel
(``found_inf``) instead of an ``if`` on the host.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fastmae import ops
from fastmae.config import PretrainConfig, parse_overrides
from fastmae.engine import faults
from fastmae.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_writes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastmae.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    full_train_state,
    init_distributed,
    load_train_state,
    shutdown,
    wrap_model,
)
from fastmae.engine.flops import peak_flops
from fastmae.engine.logger import RunLogger
from fastmae.engine.optim import build_adamw, lr_at
from fastmae.methods.registry import get_method
from fastmae.threads import resolve_threads


class TrainingAborted(RuntimeError):
    """Raised for a run that cannot continue (e.g. K non-finite steps in a row); the message says why."""


def resolve_precision(cfg: PretrainConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "fp32":
        return torch.float32
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs CUDA (it trains with a grad scaler); use bf16 or fp32 on CPU")
        return torch.float16
    if cfg.precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware computes it natively, else fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def build_data(cfg: PretrainConfig, info: DistInfo, split: str, output: str):
    """The method's loader; the training split is sharded by rank, the held-out split is read whole."""
    train = split == "train"
    return get_method(cfg.method).build_loader(
        cfg, info.rank if train else 0, info.world_size if train else 1, info.device, split, output
    )


def main(argv: list[str] | None = None) -> dict:
    # ---- config ------------------------------------------------------------------------------------------
    cfg = parse_overrides(sys.argv[1:] if argv is None else argv)
    spec = get_method(cfg.method)
    info = init_distributed(cfg.device)
    device = info.device
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        remove_partial_writes(run_dir)
    torch.set_num_threads(resolve_threads(cfg.threads))
    # Denormal floats make the CPU AdamW update ~4x slower and change nothing that matters for training.
    torch.set_flush_denormal(True)
    amp_dtype = resolve_precision(cfg, device)
    torch.manual_seed(cfg.seed)

    # ---- data --------------------------------------------------------------------------------------------
    # uint8 NHWC feeds the fused patchify kernel (it normalizes on the fly); the eager path takes float NCHW.
    img_out = "uint8" if ops.kernel_backend(device) == "triton" else "float"
    train_loader = build_data(cfg, info, "train", img_out)
    steps_per_epoch = train_loader.steps_per_epoch // cfg.accum_iter
    if steps_per_epoch < 1:
        raise ValueError(
            f"the dataset gives {train_loader.steps_per_epoch} batches of {cfg.batch_size} per rank per epoch, "
            f"fewer than accum_iter={cfg.accum_iter}: lower batch_size or accum_iter"
        )
    if info.is_main:
        cfg.save(run_dir / "config.json")

    # ---- model -------------------------------------------------------------------------------------------
    model = spec.build_model(cfg).to(device)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    eff_batch = cfg.batch_size * cfg.accum_iter * info.world_size
    base_lr = cfg.lr or cfg.blr * eff_batch / 256

    # ---- optimizer, distributed wrapping, compile -----------------------------------------------------------
    lr_t = torch.tensor(0.0, device=device)
    ddp_model = wrap_model(model, info, cfg.fsdp)
    optimizer = build_adamw(model, lr_t, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    forward = ddp_model
    if cfg.compile:
        mode = "reduce-overhead" if device.type == "cuda" and cfg.cuda_graphs else None
        forward = torch.compile(ddp_model, fullgraph=not info.enabled, mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- resume ------------------------------------------------------------------------------------------
    start_step = 0
    notes = _schedule_notes(cfg)
    resume_path = latest_checkpoint(run_dir) if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        load_train_state(model, optimizer, ckpt["model"], ckpt["optimizer"], sharded=info.enabled and cfg.fsdp)
        for group in optimizer.param_groups:
            group["lr"] = lr_t  # load_state_dict installs a copy; the schedule writes into lr_t
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        train_loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"][info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        notes += _resume_notes(cfg, ckpt.get("config") or {}, start_step, steps_per_epoch, total_steps, base_lr)
    else:
        train_loader.set_epoch(0)
        # Different masks on every rank, reproducible from the seed.
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)

    if start_step >= total_steps:
        if info.is_main:
            print(f"nothing to do: the run in {run_dir} finished at step {start_step} of {total_steps} "
                  f"({resume_path.name}); raise --epochs or --max_steps to train on, or pick a new --output_dir", flush=True)
        shutdown(info)
        return {"status": "nothing to do", "step": start_step, "run_dir": str(run_dir)}
    log = RunLogger(run_dir, total_steps, start_step, info.is_main, cfg.progress, tensorboard=cfg.tensorboard,
                    wandb=cfg.wandb if info.is_main else "", config=json.loads(cfg.to_json()))
    flops_img = spec.flops_per_image(model, cfg)
    peak = peak_flops(device)
    log.info(
        f"fastmae pretrain: {cfg.model} on {device} ({info.world_size} proc, {torch.get_num_threads()} threads), "
        f"{amp_dtype}, kernels={ops.kernel_backend(device)}, attention={_attention_backend()}, compile={cfg.compile}, "
        f"steps {start_step}->{total_steps} ({steps_per_epoch}/epoch), effective batch {eff_batch}, lr {base_lr:.3g}"
        + (f", resumed from {resume_path.name}" if resume_path else "")
    )
    log.info(f"run folder {run_dir}; " + ", ".join(log.backends))
    for note in notes:
        log.info(f"warning: {note}")

    stop = {"sigterm": False}

    def _on_sigterm(signum, frame):
        stop["sigterm"] = True

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)

    def checkpoint(step: int) -> Path | None:
        # Collective under FSDP (every rank contributes its shards), so it runs before the rank-0 filter.
        model_sd, optim_sd = full_train_state(model, optimizer, sharded=info.enabled and cfg.fsdp)
        rngs = rng_state()
        if info.enabled:
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rngs)
            rngs = gathered
        if not info.is_main:
            return None
        # Deliberate sync: a non-finite model must never reach the disk.
        if not all(torch.isfinite(v).all() for v in model_sd.values() if v.is_floating_point()):
            raise TrainingAborted("parameters became non-finite; not writing a checkpoint")
        state = {
            "model": model_sd, "optimizer": optim_sd, "step": step,
            "epoch": step // steps_per_epoch, "data": train_loader.state_dict(), "rng": rngs,
            "config": json.loads(cfg.to_json()), "versions": {"torch": str(torch.__version__), "fastmae": _version()},
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return save_checkpoint(run_dir, step, state, cfg.keep_ckpts)

    # ---- step loop ---------------------------------------------------------------------------------------
    zero = torch.zeros((), device=device)
    loss_sum, good, bad_total, bad_run, gnorm_last = (zero.clone() for _ in range(5))
    window_steps, window_t0, timed_imgs, timed_s = 0, time.perf_counter(), 0, 0.0
    last_row: dict = {}
    data_iter = iter(train_loader)
    step = start_step
    model.train()
    try:
        while step < total_steps:
            faults.set_step(step)
            lr_t.fill_(lr_at(step, steps_per_epoch, cfg.warmup_epochs, cfg.epochs, base_lr, cfg.min_lr))
            step_loss = zero.clone()
            for micro in range(cfg.accum_iter):
                batch = next(data_iter, None)
                if batch is None:  # epoch boundary
                    train_loader.set_epoch(train_loader.state_dict()["epoch"] + 1)
                    data_iter = iter(train_loader)
                    batch = next(data_iter)
                imgs = batch[0].to(device, non_blocking=True)
                sync_grads = micro == cfg.accum_iter - 1
                ctx = ddp_model.no_sync() if info.enabled and not sync_grads and not cfg.fsdp else nullcontext()
                with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    loss = faults.poison(forward(imgs, mask_ratio=cfg.mask_ratio)[0]) / cfg.accum_iter
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor norm; replicate it (a collective, not a host sync)
                gnorm = gnorm.full_tensor()
            bad = (~torch.isfinite(gnorm) | ~torch.isfinite(step_loss)).float()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                # Fused AdamW skips the update on the device when found_inf is 1: no host round trip.
                optimizer.found_inf = bad
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += torch.where(bad > 0, zero, step_loss)
            good += 1 - bad
            bad_total += bad
            bad_run = (bad_run + bad) * bad
            gnorm_last = gnorm.detach()
            step += 1
            faults.set_step(step)
            window_steps += 1
            log.advance()
            faults.point("after_step")

            if step % cfg.log_every == 0 or step == total_steps:
                # Deliberate sync, the only one per log window: all device-side statistics in one transfer.
                stats = torch.stack([all_reduce_mean(loss_sum / good.clamp(min=1), info), lr_t, gnorm_last, bad_total, bad_run])
                mean_loss, lr_now, gnorm_now, n_bad, n_bad_run = stats.tolist()
                elapsed = time.perf_counter() - window_t0
                img_s = window_steps * eff_batch / elapsed
                if step - window_steps > start_step:  # the first window holds compile and warm-up
                    timed_imgs += window_steps * eff_batch
                    timed_s += elapsed
                last_row = {"epoch": step / steps_per_epoch, "loss": mean_loss, "lr": lr_now,
                            "grad_norm": gnorm_now, "img_s": img_s, "skipped": int(n_bad)}
                if flops_img and peak:
                    last_row["mfu"] = img_s * flops_img / (peak * info.world_size)
                log.log(step, last_row)
                if int(n_bad_run) >= cfg.max_bad_steps:
                    raise TrainingAborted(
                        f"{int(n_bad_run)} consecutive steps had a non-finite loss or gradient "
                        f"(max_bad_steps={cfg.max_bad_steps}); lower the learning rate or check the data"
                    )
                loss_sum.zero_()
                good.zero_()
                window_steps, window_t0 = 0, time.perf_counter()

            if step % cfg.ckpt_every == 0 or step == total_steps or stop["sigterm"]:
                path = checkpoint(step)
                if stop["sigterm"]:
                    log.info(f"SIGTERM: saved {path} at step {step}; exiting")
                    return {"status": "preempted", "step": step, "checkpoint": str(path)}
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        log.close()

    # ---- held-out evaluation and reconstructions -----------------------------------------------------------
    summary = {"status": "done", "step": step, "train_loss": last_row.get("loss"), "skipped_steps": int(bad_total.item()),
               "img_s": timed_imgs / timed_s if timed_s else last_row.get("img_s"), "run_dir": str(run_dir),
               "img_s_note": "after warm-up" if timed_s else "one log window, start-up included"}
    sharded = info.enabled and cfg.fsdp
    if info.is_main or sharded:
        # Under FSDP every rank must run the forward (it gathers shards); only rank 0 writes.
        summary.update(_evaluate_and_visualize(spec, cfg, model, info, run_dir, amp_dtype))
    if info.is_main:
        from fastmae.viz import save_curves

        curves = save_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.method} {cfg.preset}")
        if curves is not None:
            summary["curves"] = str(curves)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(_summary_text(summary))
    shutdown(info)
    return summary


def _evaluate_and_visualize(spec, cfg: PretrainConfig, model, info: DistInfo, run_dir: Path, amp_dtype) -> dict:
    from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD

    val = build_data(cfg, info, "val", "float")
    ev = spec.evaluate(model, val, info.device, cfg.mask_ratio, amp_dtype, keep=cfg.num_vis)
    held = getattr(val, "holdout_fraction", 0.0)
    out = {"val_loss": ev["loss"], "val_images": ev["count"], "val_unit": ev["unit"],
           "val_source": f"a seeded {held:.0%} of the training files, excluded from training (no val/ split)" if held
           else "the data set's val split"}
    if "sample" not in ev:
        return out
    batch, noise = ev["sample"]
    names = None
    source = getattr(val, "source", None)
    if source is not None and spec.unit == "images" and batch.ndim == 4:
        # A fixed, seeded choice of held-out images (not the first files), with their names beside the picture.
        from fastmae.viz import pick_images

        batch, names = pick_images(source, min(cfg.num_vis, len(source)), cfg.img_size, cfg.seed, IMAGENET_MEAN, IMAGENET_STD)
        batch = batch.to(info.device)
        noise = torch.rand(spec.noise_shape(model, batch), generator=torch.Generator().manual_seed(cfg.seed)).to(info.device)
    path = run_dir / "reconstructions.png" if info.is_main else None
    written = spec.visualize(model, batch, cfg.mask_ratio, noise, path, IMAGENET_MEAN, IMAGENET_STD)
    if written is not None:
        out["reconstructions"] = str(written)
        if names is not None:
            _add_row_names(Path(written).with_suffix(".json"), names)
    return out


def _add_row_names(info_path: Path, names: list[str]) -> None:
    """Name the image of each row in the JSON the grid writes beside itself."""
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    info["rows"] = [{"row": i, "file": n} for i, n in enumerate(names)]
    info_path.write_text(json.dumps(info, indent=2) + "\n")


def _schedule_notes(cfg: PretrainConfig) -> list[str]:
    notes = []
    if cfg.warmup_epochs >= cfg.epochs:
        notes.append(f"warmup_epochs={cfg.warmup_epochs:g} >= epochs={cfg.epochs}: the learning rate only ramps up and "
                     f"never decays (lower --warmup_epochs)")
    return notes


def _resume_notes(cfg: PretrainConfig, old: dict, step: int, steps_per_epoch: int, total_steps: int,
                  base_lr: float) -> list[str]:
    """What resuming with another schedule length does: the cosine is recomputed for the new length."""
    keys = ("epochs", "max_steps", "warmup_epochs")
    changed = {k: (old[k], getattr(cfg, k)) for k in keys if k in old and old[k] != getattr(cfg, k)}
    if not changed:
        return []
    prev = dict(epochs=old.get("epochs", cfg.epochs), warmup=old.get("warmup_epochs", cfg.warmup_epochs))
    lr_old = lr_at(step, steps_per_epoch, prev["warmup"], prev["epochs"], base_lr, cfg.min_lr)
    lr_new = lr_at(step, steps_per_epoch, cfg.warmup_epochs, cfg.epochs, base_lr, cfg.min_lr)
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    return [f"resuming with {what}: the schedule is recomputed for the new length, so at step {step} the learning "
            f"rate jumps from {lr_old:.3g} to {lr_new:.3g} and the run now ends at step {total_steps} "
            f"(a stretched schedule, not the one a fresh run of this length would follow)"]


def _summary_text(s: dict) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [
        "== fastmae pretrain summary ==",
        f"steps            {s['step']} (skipped non-finite: {s['skipped_steps']})",
        f"train loss       {fmt(s.get('train_loss'))}  (masked patches, last log window)",
        f"held-out loss    {fmt(s.get('val_loss'))}  ({s.get('val_images')} {s.get('val_unit', 'images')}, fixed masks; "
        f"{s.get('val_source', 'val split')})",
        f"throughput       {fmt(s.get('img_s'))} img/s ({s.get('img_s_note', 'after warm-up')})",
        f"run directory    {s['run_dir']}  ({', '.join(_run_files(Path(s['run_dir'])))})",
    ]
    return "\n".join(lines)


def _run_files(run_dir: Path) -> list[str]:
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith((".", "checkpoint-")))
    return names + (["checkpoint-*.pt"] if any(run_dir.glob("checkpoint-*.pt")) else [])


def _attention_backend() -> str:
    from fastmae.layers import attention_backend

    return attention_backend()


def _version() -> str:
    import fastmae

    return fastmae.__version__


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point with the CLI's error contract: config errors are one line, exit code 2."""
    from fastmae.config import help_text

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        usage = "usage: fastmae pretrain [--preset=NAME] [--key=value ...]  (python train.py is the same program)"
        print(help_text(argv, PretrainConfig, None, usage))
        return 0
    try:
        parse_overrides(argv)
    except ValueError as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    try:
        main(argv)
    except TrainingAborted as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # Configuration problems found while setting up (data, device, checkpoint) are the user's to fix.
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    return 0
