"""Checkpoint save time per GB on this machine: ``file`` vs ``dcp`` vs ``dcp-async`` (issue 20 item 11).

    python bench/bench_ckpt.py                      # a 512 MB training state, 3 interleaved rounds
    python bench/bench_ckpt.py --mb=64 --rounds=1   # quick

The state looks like a ViT's training checkpoint (fp32 weight matrices, AdamW's two moments, a step counter per
tensor, the non-tensor entries). Each contender runs the real code path, checksums included:
- ``file``: :func:`fastmae.engine.checkpoint.atomic_save` (one ``.pt``, its size + sha256 sidecar, fsync, rename);
- ``dcp``: :func:`fastmae.engine.dcp.save_local` (a DCP folder, the manifest, fsync, rename), blocking: the
  preemption save;
- ``dcp-async``: :class:`fastmae.engine.dcp.AsyncSaver`; ``stall`` is what the step loop waits for (the CPU copy),
  ``total`` until the folder is complete.
Medians over ``--rounds``; ratios against ``file`` in the same run. The page cache absorbs writes of this size, so
these are upper bounds on what a parallel file system will give; the disk under ``--dir`` is the one measured.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastmae.engine import dcp  # noqa: E402
from fastmae.engine.checkpoint import atomic_save, checkpoint_path  # noqa: E402


def make_state(mb: int) -> dict:
    """~``mb`` MB: weights + two AdamW moments of 768 x 3072 fp32 matrices (9.4 MB each)."""
    n = max(1, round(mb / (3 * 768 * 3072 * 4 / 1e6)))
    g = torch.Generator().manual_seed(0)
    model = {f"blocks.{i}.mlp.fc1.weight": torch.randn(3072, 768, generator=g) for i in range(n)}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(3072, 768, generator=g),
                 "exp_avg_sq": torch.rand(3072, 768, generator=g)} for i in range(n)}
    optim = {"state": state, "param_groups": [{"params": list(range(n)), "lr": 1e-4, "betas": (0.9, 0.95)}]}
    return {"model": model, "optimizer": optim, "step": 10, "epoch": 0, "data": {"epoch": 0, "step": 10}, "rng": {},
            "config": {}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_round(state: dict, root: Path, step: int) -> dict[str, float]:
    saver = dcp.AsyncSaver()
    out = {"file": _timed(lambda: atomic_save(state, checkpoint_path(root, step))),
           "dcp": _timed(lambda: dcp.save_local(root / "blocking", step, state))}
    t0 = time.perf_counter()
    saver.start(root / "async", step, state)
    out["dcp-async stall"] = time.perf_counter() - t0
    saver.close()
    out["dcp-async total"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="", help="where to write (default: a temporary folder under /tmp)")
    args = ap.parse_args(argv)
    state = make_state(args.mb)
    gb = sum(t.numel() * t.element_size() for t in dcp.split_tensors(state)[1].values()) / 1e9
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or None))
    rows: dict[str, list[float]] = {}
    try:
        for r in range(-1, args.rounds):  # round -1 warms up (DCP's imports and first-call set-up), not counted
            for sub in ("blocking", "async"):
                (root / sub).mkdir(exist_ok=True)
            for k, v in run_round(make_state(8) if r < 0 else state, root, r + 1).items():
                if r >= 0:
                    rows.setdefault(k, []).append(v)
            for p in root.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ref = statistics.median(rows["file"])
    print(f"checkpoint of {gb:.3f} GB, {args.rounds} round(s), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| contender | median s | s/GB | vs file |\n|---|---|---|---|")
    for k, v in rows.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.3f} | {m / gb:.2f} | {m / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
