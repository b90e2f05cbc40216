"""Masked-image-modeling pretraining, top to bottom: config -> data -> model -> compile -> step loop -> log/checkpoint.

``python train.py [--key=value ...]`` and ``fastmae pretrain`` both run :func:`main`.
With no arguments it pretrains a tiny MAE on the embedded demo set (photos that
ship inside installed packages) on the CPU in a few minutes. ``--method`` picks any
registered method (``fastmae.methods``): its spec supplies the model, the loader, the
FLOP count, the held-out evaluation and the pictures; this file never branches on it.

The step (``fastmae.engine.step.train_step``) never synchronizes with the host: loss,
grad norm and the bad-step counters stay on the device and are read every
``log_every`` steps; a non-finite loss or gradient skips the update inside the fused
AdamW kernel (``found_inf``) instead of an ``if`` on the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch

from fastmae import ops
from fastmae.config import PretrainConfig, flat_config, help_text, parse_overrides
from fastmae.constants import IMAGENET_MEAN, IMAGENET_STD
from fastmae.engine import faults
from fastmae.engine.checkpoint import (
    CheckpointWriteError,
    check_position,
    find_resume_checkpoint,
    list_checkpoints,
    remove_partial_writes,
)
from fastmae.engine.dcp import resolve_format, timed_note
from fastmae.engine.distributed import (
    DistInfo,
    WrapOptions,
    all_reduce_mean,
    init_distributed,
    shutdown,
    wrap_model,
)
from fastmae.engine.flops import peak_flops
from fastmae.engine.logger import DATA_WAIT_WARN, DataWait, RunLogger, data_wait_warning, read_metrics_lines
from fastmae.engine.optim import build_adamw, lr_at
from fastmae.engine.plan import build_meta_model, layout_for, model_shape
from fastmae.engine.preemption import SAVED_DIR, Preemption, mark_saved
from fastmae.engine.runlock import RunLock
from fastmae.engine.state import TrainState
from fastmae.engine.step import BatchStream, LogWindow, StepStats, TrainingAborted, resolve_precision, train_step
from fastmae.layers import attention_backend
from fastmae.layers.attention import attention_table, describe_attention, load_attention_table, set_attention_table
from fastmae.methods.registry import MethodSpec, get_method
from fastmae.threads import resolve_threads


def main(argv: list[str] | None = None) -> dict:
    """Train; SIGTERM from the start on means "save at an agreed step and return", and rank 0 holds the run
    folder's lock throughout (one run per folder)."""
    cfg = parse_overrides(sys.argv[1:] if argv is None else argv)
    check_world_size(cfg)
    info = init_distributed(cfg.device)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with Preemption(info) as preemption, RunLock(run_dir) if info.is_main else nullcontext():
        result = train(cfg, info, run_dir, preemption)
    shutdown(info)
    return result


def train(cfg: PretrainConfig, info: DistInfo, run_dir: Path, preemption: Preemption) -> dict:
    # ---- config ------------------------------------------------------------------------------------------
    spec, cfg, amp_dtype, layout = setup_process(cfg, info, run_dir)
    device, sharded = info.device, info.enabled and cfg.step.fsdp

    # ---- data --------------------------------------------------------------------------------------------
    train_loader, steps_per_epoch, total_steps = training_data(spec, cfg, info)

    # ---- model, optimizer, distributed wrapping, compile -------------------------------------------------
    t = build_training(spec, cfg, info, amp_dtype, layout)

    # ---- resume ------------------------------------------------------------------------------------------
    # Checkpoints keep the flat config (the layout of older checkpoints, which export and evaluation read).
    state = TrainState(t.model, t.optimizer, train_loader, t.lr_t, info, sharded, t.scaler, steps_per_epoch, cfg.flat(),
                       ckpt_format=resolve_format(cfg.checkpoint.ckpt_format, info.world_size))
    found = find_resume_checkpoint(run_dir, cfg.resume, warn=lambda msg: print(msg, file=sys.stderr) if info.is_main else None)
    resume_path = found[0] if found else None
    start_step, notes = resume_or_start(state, found and found[1], cfg, info, total_steps, t.base_lr)
    if start_step >= total_steps and summary_written(run_dir, start_step):
        return nothing_to_do(run_dir, start_step, total_steps, resume_path, info)
    # The run has started: only now may it leave traces (a failed resume rewrites nothing).
    if info.is_main:
        cfg.save(run_dir / "config.json")
    log, window = start_logging(spec, cfg, info, t, run_dir, (start_step, total_steps, steps_per_epoch))
    log_start(log, cfg, info, t, amp_dtype, layout, train_loader, run_dir, (start_step, total_steps, steps_per_epoch),
              resume_path, notes)

    # ---- step loop ---------------------------------------------------------------------------------------
    def loss_fn(imgs):  # the step's loss: the method's masked-image objective on one micro-batch
        return t.forward(imgs, mask_ratio=cfg.model.mask_ratio)[0]

    monitor = build_monitor(cfg, t.model, info, sharded)
    stats = StepStats.zeros(device)
    bad_data = BadDataReport(train_loader)
    next_batch = DataWait(BatchStream(train_loader, device))
    step, saved = start_step, None
    t.model.train()
    with closing(log):
        while step < total_steps:
            faults.set_step(step)
            sched = cfg.schedule
            t.lr_t.fill_(lr_at(step, steps_per_epoch, sched.warmup_epochs, sched.epochs, t.base_lr, sched.min_lr))
            train_step(loss_fn, t.optimizer, t.params, next_batch, accum_iter=cfg.optim.accum_iter, amp_dtype=amp_dtype,
                       clip_grad=cfg.optim.clip_grad, scaler=t.scaler, no_sync=t.no_sync, stats=stats)
            step += 1
            faults.set_step(step)
            window.tick()
            log.advance()
            faults.point("after_step")
            stop = preemption.stop_now()
            row = {}
            if step % cfg.logging.log_every == 0 or step == total_steps:
                row = window.close(step, stats, t.lr_t, reduce=lambda x: all_reduce_mean(x, info))
                row["data_wait"] = next_batch.close()
                bad_data.log_new(log)
            if monitor is not None and monitor.due(step, step == total_steps):
                with window.paused():  # scoring is not training: it stays out of the throughput
                    row.update(monitor.score(t.model, amp_dtype))  # between steps, rank 0 only
            if row:
                log.log(step, row)
                window.check_bad_run(cfg.step.max_bad_steps)
            if step % cfg.checkpoint.ckpt_every == 0 or step == total_steps or stop:
                path, saved = save_checkpoint(state, run_dir, step, cfg, final=stop or step == total_steps)
                if stop:
                    mark_saved(run_dir, info.rank, step)
                    log.info(f"SIGTERM: saved {path} at step {step}; exiting" + (f" ({saved})" if saved else ""))
                    return {"status": "preempted", "step": step, "checkpoint": str(path), "checkpoint_save": saved}
    state.finish_saves()  # deliberate sync: a background checkpoint write lands (or fails loudly) before the summary

    # ---- held-out evaluation and reconstructions -----------------------------------------------------------
    # A run killed between its last checkpoint and its summary comes back here with no step left to train.
    last_loss = window.last_row.get("loss", last_logged_loss(run_dir) if step == start_step else None)
    summary = {"status": "done", "step": step, "train_loss": last_loss, "skipped_steps": int(stats.bad_total.item()),
               **window.summary(), "run_dir": str(run_dir), "data_wait": next_batch.run_fraction(),
               **bad_data.summary(info), "checkpoint_save": saved}
    if info.is_main or sharded:  # under FSDP every rank must run the forward (it gathers shards); rank 0 writes
        summary.update(evaluate(spec, cfg, t.model, info, run_dir, amp_dtype))
    if info.is_main:
        write_summary(summary, cfg, run_dir, log)
    return summary


def training_data(spec: MethodSpec, cfg: PretrainConfig, info: DistInfo):
    """(train loader, optimizer steps per epoch, total optimizer steps)."""
    # uint8 NHWC feeds the fused patchify kernel (it normalizes on the fly); the eager path takes float NCHW.
    img_out = "uint8" if ops.kernel_backend(info.device) == "triton" else "float"
    train_loader = build_data(spec, cfg, info, "train", img_out)
    steps_per_epoch = optimizer_steps_per_epoch(train_loader, cfg)
    return train_loader, steps_per_epoch, cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch


def setup_process(cfg: PretrainConfig, info: DistInfo, run_dir: Path):
    """The run folder, threads, precision and attention table of this process, and the batch layout; returns
    (method spec, cfg with the layout's batch split, autocast dtype, layout)."""
    prepare_run_dir(run_dir, cfg.resume, info)
    torch.set_num_threads(resolve_threads(cfg.threads))
    # Denormal floats make the CPU AdamW update ~4x slower and change nothing that matters for training.
    torch.set_flush_denormal(True)
    amp_dtype = resolve_precision(cfg.step.precision, info.device)
    set_attention_table(load_attention_table(cfg.step.attention_table))  # before any model is built or compiled
    torch.manual_seed(cfg.seed)
    # On GPUs the effective batch comes from more GPUs before accumulation, and CUDA graphs never replay an
    # accumulating backward (DESIGN.md, hazard); the decision and its reason are logged at start.
    layout = layout_for(cfg, info.world_size)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=layout.batch_size,
                                                               accum_iter=layout.accum_iter))
    return get_method(cfg.method.name), cfg, amp_dtype, layout


@dataclasses.dataclass
class Training:
    """What the step loop drives: the model, its (wrapped, compiled) forward, the optimizer and the learning rate."""

    model: torch.nn.Module
    forward: object
    optimizer: torch.optim.Optimizer
    scaler: object
    params: list
    no_sync: object
    lr_t: torch.Tensor  # the schedule writes into it: a compiled step never sees a new constant
    eff_batch: int
    base_lr: float
    fp8_note: str


def build_training(spec: MethodSpec, cfg: PretrainConfig, info: DistInfo, amp_dtype, layout) -> Training:
    device = info.device
    model = spec.build_model(cfg).to(device)
    fp8_note = apply_fp8(model, cfg.step.fp8, device)
    eff_batch = cfg.optim.batch_size * cfg.optim.accum_iter * info.world_size
    lr_t = torch.tensor(0.0, device=device)
    ddp_model = wrap_model(model, info, cfg.step.fsdp, WrapOptions(
        param_dtype=amp_dtype if amp_dtype != torch.float32 else None, grad_compression=cfg.step.grad_compression,
        hsdp=cfg.step.hsdp))
    optimizer = build_adamw(model, lr_t, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), device)
    return Training(
        model=model, forward=compile_forward(ddp_model, cfg, info, layout.compile_mode), optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        params=[p for p in model.parameters() if p.requires_grad],
        no_sync=ddp_model.no_sync if info.enabled and not cfg.step.fsdp else None, lr_t=lr_t, eff_batch=eff_batch,
        base_lr=cfg.optim.lr or cfg.optim.blr * eff_batch / 256, fp8_note=fp8_note)


def start_logging(spec: MethodSpec, cfg: PretrainConfig, info: DistInfo, t: Training, run_dir: Path,
                  steps: tuple[int, int, int]) -> tuple[RunLogger, LogWindow]:
    start_step, total_steps, steps_per_epoch = steps
    log = RunLogger(run_dir, total_steps, start_step, info.is_main, cfg.logging.progress, tensorboard=cfg.logging.tensorboard,
                    wandb=cfg.logging.wandb if info.is_main else "", config=json.loads(cfg.to_json()))
    # Rows the interrupted run logged after its checkpoint (all of them if it died before its first) would
    # appear twice and out of order.
    log.resume_at(start_step)
    peak = peak_flops(info.device)
    window = LogWindow(t.eff_batch, start_step, steps_per_epoch, spec.flops_per_image(t.model, cfg),
                       peak and peak * info.world_size)
    return log, window


def nothing_to_do(run_dir: Path, start_step: int, total_steps: int, resume_path, info: DistInfo) -> dict:
    if info.is_main:
        print(f"nothing to do: the run in {run_dir} finished at step {start_step} of {total_steps} "
              f"({resume_path.name}); raise --epochs or --max_steps to train on, or pick a new --output_dir", flush=True)
    return {"status": "nothing to do", "step": start_step, "run_dir": str(run_dir)}


def log_start(log: RunLogger, cfg: PretrainConfig, info: DistInfo, t: Training, amp_dtype, layout, train_loader,
              run_dir: Path, steps: tuple[int, int, int], resume_path, notes: list[str]) -> None:
    """The start-up lines: what runs where, the batch layout and attention kernels, FP8, repeated sampling, warnings."""
    (start_step, total_steps, steps_per_epoch), device = steps, info.device
    log.info(
        f"fastmae pretrain: {cfg.model.name} on {device} ({info.world_size} proc, {torch.get_num_threads()} threads), "
        f"{amp_dtype}, kernels={ops.kernel_backend(device)}, attention={attention_backend()}, compile={cfg.step.compile}, "
        f"residual {cfg.step.residual_dtype}, steps {start_step}->{total_steps} ({steps_per_epoch}/epoch), effective "
        f"batch {t.eff_batch}, lr {t.base_lr:.3g}" + (f", resumed from {resume_path.name}" if resume_path else "")
    )
    log.info(f"layout: batch {cfg.optim.batch_size} x accum {cfg.optim.accum_iter} x {info.world_size} proc; {layout.reason}"
             + (f"; {layout.note}" if layout.note else "") + f"; attention kernels "
             f"{attention_kernels(cfg, amp_dtype, device, run_dir / 'attention.json' if info.is_main else None)}")
    log.info(t.fp8_note)
    if getattr(train_loader, "repeat", 1) > 1:
        k = train_loader.repeat
        log.info(f"repeat_samples={k}: each image is decoded once for {k} crops (each its own mask); an epoch is {k} x "
                 f"{train_loader.num_files} files = {train_loader.num_samples} samples, and epochs, the lr schedule and "
                 "the resume position count samples")
    log.info(f"run folder {run_dir}; " + ", ".join(log.backends) + "".join(f"\nwarning: {note}" for note in notes))


def save_checkpoint(state: TrainState, run_dir: Path, step: int, cfg: PretrainConfig, final: bool):
    """(path, "X GB in Y s" or None). The preemption and the final save block (the process exits next); the others
    may write in the background."""
    t0 = time.perf_counter()
    path = state.save(run_dir, step, cfg.checkpoint.keep_ckpts, blocking=final)
    return path, timed_note(path, time.perf_counter() - t0) if path is not None and path.exists() else None


def build_monitor(cfg: PretrainConfig, model, info: DistInfo, sharded: bool):
    """The online k-NN monitor of ``--monitor=knn`` on rank 0 (the embedded digits at the model's input size),
    or None."""
    if not cfg.logging.monitor or not info.is_main or sharded or not hasattr(model, "forward_features"):
        if cfg.logging.monitor and info.is_main:
            print(f"fastmae: warning: --monitor={cfg.logging.monitor} needs an image encoder on one process or DDP "
                  f"(not FSDP); monitoring is off", file=sys.stderr)
        return None
    from fastmae.engine.monitor import KnnMonitor
    from fastmae.eval.data import load_digits_split

    split = load_digits_split(cfg.data.img_size, model.patch_embed.in_chans, seed=cfg.seed)
    dev = info.device
    return KnnMonitor(split.train_x.to(dev), split.train_y.to(dev), split.test_x.to(dev), split.test_y.to(dev),
                      split.num_classes, every=cfg.logging.monitor_every or cfg.checkpoint.ckpt_every)


def resume_or_start(state: TrainState, ckpt: dict | None, cfg: PretrainConfig, info: DistInfo, total_steps: int,
                    base_lr: float) -> tuple[int, list[str]]:
    """Restore ``ckpt`` (after checking that its position fits this run) or start at epoch 0; returns the first
    step and the warnings to print about the schedule."""
    notes = schedule_notes(cfg)
    if ckpt is None:
        state.loader.set_epoch(0)
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # different masks on every rank, reproducible from the seed
        return 0, notes
    check_position(ckpt, total_steps=total_steps, steps_per_epoch=state.steps_per_epoch, accum_iter=cfg.optim.accum_iter,
                   loader_steps_per_epoch=getattr(state.loader, "steps_per_epoch", None))
    old = flat_config(ckpt.get("config"))
    notes += learning_problem_changes(cfg, old)
    step = state.load_state_dict(ckpt)
    return step, notes + resume_notes(cfg, old, step, state.steps_per_epoch, total_steps, base_lr)


class BadDataReport:
    """Files that passed the scan but failed to decode at run time (corrupt JPEGs, decompression bombs): the
    loader substitutes the next good sample; each such file is named in the log once, and
    the summary counts and names the substitutions of every rank."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.scanned = len(getattr(loader, "bad_files", []))  # the scan's finds, reported before training
        self.logged = self.scanned

    def log_new(self, log: RunLogger) -> None:
        files = getattr(self.loader, "bad_files", [])
        for name, reason in files[self.logged:]:
            log.info(f"warning: substituted {name} with the next good sample: {reason}")
        self.logged = len(files)

    def summary(self, info: DistInfo) -> dict:
        count = int(getattr(self.loader, "substitutions", 0))
        files = [name for name, _ in getattr(self.loader, "bad_files", [])[self.scanned:]][:100]
        if info.enabled and torch.distributed.is_initialized():
            # Each rank's loader saw its own shard. Called once, after the last step, where the summary already
            # syncs (it reads counters to the host): one collective brings every rank's count and names.
            ranks: list = [None] * info.world_size
            torch.distributed.all_gather_object(ranks, (count, files))
            count = sum(int(c) for c, _ in ranks)
            files = list(dict.fromkeys(name for _, names in ranks for name in names))[:100]
        return {"substitutions": count, "substituted_files": files}


def summary_written(run_dir: Path, step: int) -> bool:
    """Whether ``summary.json`` reports this run finished at ``step`` (a kill may have come before it)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("step") == step
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def last_logged_loss(run_dir: Path) -> float | None:
    rows = [r for _, r in read_metrics_lines(run_dir / "metrics.jsonl") if r is not None and "loss" in r]
    return rows[-1]["loss"] if rows else None


# Keys whose change mid-run makes the resumed run learn a different problem from the one its weights learned.
PROBLEM_KEYS = ("method", "model", "mask_ratio", "norm_pix_loss", "img_size", "patch_size", "mask_patch_size",
                "num_frames", "frame_stride", "tubelet_size", "video_target_norm", "mask_type", "loss_on",
                "encoder_mask_tokens", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "prediction_ratio",
                "feature_fusion", "augment")


def learning_problem_changes(cfg: PretrainConfig, old: dict) -> list[str]:
    """Refuse to resume when a :data:`PROBLEM_KEYS` key differs from the checkpoint's config; with
    ``--allow_config_change`` return the warning instead."""
    new = cfg.flat()
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in PROBLEM_KEYS if k in old and k in new and old[k] != new[k]]
    if not changed:
        return []
    what = ", ".join(changed)
    if not cfg.allow_config_change:
        raise ValueError(f"resuming with {what} changes what the run learns; pass --allow_config_change to resume "
                         "anyway, or start a new --output_dir")
    return [f"resuming with {what} (--allow_config_change): the run now learns a different problem"]


def check_world_size(cfg: PretrainConfig) -> None:
    """--world_size describes a plan's target; a training run uses the processes its launcher started."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if cfg.plan.world_size and str(cfg.plan.world_size) != launched:
        raise ValueError(f"--world_size={cfg.plan.world_size} disagrees with the launcher (WORLD_SIZE={launched}); "
                         "it sets the target of a plan (--dry_run), training runs on the processes torchrun starts")


def write_summary(summary: dict, cfg: PretrainConfig, run_dir: Path, log: RunLogger) -> None:
    """Rank 0: loss curves, ``summary.json`` and the summary text."""
    from fastmae.viz import save_curves

    curves = save_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.method.name} {cfg.preset}")
    if curves is not None:
        summary["curves"] = str(curves)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(summary_text(summary))
    if (summary.get("data_wait") or 0.0) > DATA_WAIT_WARN:
        log.info(data_wait_warning(summary["data_wait"], "this run"))


def prepare_run_dir(run_dir: Path, resume: str, info: DistInfo) -> None:
    """Refuse a fresh run in a folder with checkpoints; rank 0 (holding the lock) deletes what killed
    checkpoint writes of this folder left behind."""
    if not resume and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints of another run; use --resume=auto or a new --output_dir")
    if info.is_main:
        remove_partial_writes(run_dir)
        shutil.rmtree(run_dir / SAVED_DIR, ignore_errors=True)  # preemption-save files speak of this run only


def build_data(spec: MethodSpec, cfg: PretrainConfig, info: DistInfo, split: str, output: str):
    """The method's loader; the training split is sharded by rank, the held-out split is read whole."""
    train = split == "train"
    return spec.build_loader(cfg, info.rank if train else 0, info.world_size if train else 1, info.device, split, output)


def optimizer_steps_per_epoch(loader, cfg: PretrainConfig) -> int:
    steps = loader.steps_per_epoch // cfg.optim.accum_iter
    if steps < 1:
        raise ValueError(
            f"the dataset gives {loader.steps_per_epoch} batches of {cfg.optim.batch_size} per rank per epoch, "
            f"fewer than accum_iter={cfg.optim.accum_iter}: lower batch_size or accum_iter"
        )
    return steps


def apply_fp8(model, mode: str, device: torch.device) -> str:
    """``--fp8``: torchao's float8 training for the block linears (before DDP/FSDP wrapping and compile); the log line."""
    if mode == "off":
        return "fp8: off (bf16 GEMMs)"
    from fastmae.engine.fp8 import convert_fp8

    swapped, skipped = convert_fp8(model, mode, device)
    return (f"fp8: {mode} scaling on {len(swapped)} block linears; bf16 kept for "
            + ", ".join(f"{name} ({why})" for name, why in skipped.items()))


def compile_forward(model, cfg: PretrainConfig, info: DistInfo, mode: str):
    """``torch.compile`` (one graph on a single process) in the layout's mode, or the model.

    ``mode`` is the one decision of :func:`fastmae.engine.plan.layout_for`: ``reduce-overhead`` (CUDA graphs) only
    for CUDA with compile and no gradient accumulation (gradients accumulated across replays of a graphed backward
    live in the graph's memory pool and are overwritten; DESIGN.md, hazard); ``max-autotune-no-cudagraphs`` lets
    Inductor pick GEMM templates with fused epilogues when ``--compile_mode`` asks for it.
    """
    if not cfg.step.compile:
        return model
    return torch.compile(model, fullgraph=not info.enabled, mode=None if mode in ("default", "none") else mode)


def attention_kernels(cfg: PretrainConfig, amp_dtype: torch.dtype, device: torch.device, record: Path | None = None) -> str:
    """The kernel each attention shape of an MAE run gets (encoder / decoder), for the start-up log; with ``record``
    also written there as JSON with where each choice came from (the measured table or the rules)."""
    try:
        model = build_meta_model(cfg.model.name, cfg.data.img_size, cfg.model.patch_size)
    except ValueError:
        return f"policy {attention_backend()}"
    shapes = model_shape(model, cfg.data.img_size, cfg.model.mask_ratio).attention_shapes()
    chosen = describe_attention(shapes, amp_dtype, device.type)
    if record is not None:
        table = attention_table() or {}
        rows = {name: {"head_dim": hd, "tokens": t, "kernel": chosen[name],
                       "source": f"table {cfg.step.attention_table}" if table.get((hd, t), ("",))[0] == chosen[name] else "rules"}
                for name, (hd, t) in shapes.items()}
        record.write_text(json.dumps({"policy": attention_backend(), "dtype": str(amp_dtype), "device": device.type,
                                      "shapes": rows}, indent=2) + "\n")
    return ", ".join(f"{name} {shapes[name][0]}-dim x {shapes[name][1]} tokens: {k}" for name, k in chosen.items())


def evaluate(spec: MethodSpec, cfg: PretrainConfig, model, info: DistInfo, run_dir: Path, amp_dtype) -> dict:
    """Held-out loss with fixed masks and, where the method draws them, reconstructions of a seeded choice of images."""
    val = build_data(spec, cfg, info, "val", "float")
    ev = spec.evaluate(model, val, info.device, cfg.model.mask_ratio, amp_dtype, keep=cfg.logging.num_vis)
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

        batch, names = pick_images(source, min(cfg.logging.num_vis, len(source)), cfg.data.img_size, cfg.seed,
                                   IMAGENET_MEAN, IMAGENET_STD)
        batch = batch.to(info.device)
        noise = torch.rand(spec.noise_shape(model, batch), generator=torch.Generator().manual_seed(cfg.seed)).to(info.device)
    path = run_dir / "reconstructions.png" if info.is_main else None
    written = spec.visualize(model, batch, cfg.model.mask_ratio, noise, path, IMAGENET_MEAN, IMAGENET_STD)
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


def schedule_notes(cfg: PretrainConfig) -> list[str]:
    """Warnings about a schedule that cannot do what its keys suggest."""
    notes = []
    if cfg.schedule.warmup_epochs >= cfg.schedule.epochs:
        notes.append(f"warmup_epochs={cfg.schedule.warmup_epochs:g} >= epochs={cfg.schedule.epochs}: the learning rate "
                     "only ramps up and never decays (lower --warmup_epochs)")
    return notes


def resume_notes(cfg: PretrainConfig, old: dict, step: int, steps_per_epoch: int, total_steps: int, base_lr: float) -> list[str]:
    """What resuming with another schedule length does: the cosine is recomputed for the new length."""
    keys = ("epochs", "max_steps", "warmup_epochs")
    new = cfg.flat()
    changed = {k: (old[k], new[k]) for k in keys if k in old and old[k] != new[k]}
    if not changed:
        return []
    sched = cfg.schedule
    lr_old = lr_at(step, steps_per_epoch, old.get("warmup_epochs", sched.warmup_epochs), old.get("epochs", sched.epochs),
                   base_lr, sched.min_lr)
    lr_new = lr_at(step, steps_per_epoch, sched.warmup_epochs, sched.epochs, base_lr, sched.min_lr)
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    return [f"resuming with {what}: the schedule is recomputed for the new length, so at step {step} the learning "
            f"rate jumps from {lr_old:.3g} to {lr_new:.3g} and the run now ends at step {total_steps} "
            f"(a stretched schedule, not the one a fresh run of this length would follow)"]


def summary_text(s: dict) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [
        "== fastmae pretrain summary ==",
        f"steps            {s['step']} (skipped non-finite: {s['skipped_steps']})",
        f"train loss       {fmt(s.get('train_loss'))}  (masked patches, last log window)",
        f"held-out loss    {fmt(s.get('val_loss'))}  ({s.get('val_images')} {s.get('val_unit', 'images')}, fixed masks; "
        f"{s.get('val_source', 'val split')})",
        f"throughput       {fmt(s.get('img_s'))} img/s ({s.get('img_s_note', 'after warm-up')})",
        *([f"substituted      {s['substitutions']} sample(s) that failed to decode: "
           f"{', '.join(map(str, s.get('substituted_files', [])[:5]))}"] if s.get("substitutions") else []),
        f"data wait        {_pct(s.get('data_wait'))} of wall time in next(loader) (same windows as throughput; "
        f"warning above {DATA_WAIT_WARN:.0%})",
        *([f"last checkpoint  {s['checkpoint_save']}"] if s.get("checkpoint_save") else []),
        f"run directory    {s['run_dir']}  ({', '.join(_run_files(Path(s['run_dir'])))})",
    ]
    return "\n".join(lines)


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, float) else str(v)


def _run_files(run_dir: Path) -> list[str]:
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith((".", "checkpoint-")))
    return names + [f"checkpoint-*.{ext}" for ext in ("pt", "dcp") if any(run_dir.glob(f"checkpoint-*.{ext}"))]


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point with the CLI's error contract: config errors are one line, exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        usage = "usage: fastmae pretrain [--preset=NAME] [--key=value ...]  (python train.py is the same program)"
        print(help_text(argv, PretrainConfig, None, usage))
        return 0
    try:
        cfg = parse_overrides(argv)
    except ValueError as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:  # the plan for the target (GPUs, memory, time) without building data or touching a device
        from fastmae.plan import main as plan_main

        return plan_main(argv)
    try:
        main(argv)
    except TrainingAborted as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # Configuration problems found while setting up (data, device, checkpoint) are the user's to fix.
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 1
    # The run is complete and saved: a SIGTERM now must not turn exit 0 into death by signal (Python restores
    # the default action of signals with Python handlers while it shuts down; an ignored one stays ignored).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0
