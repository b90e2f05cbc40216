"""Run logging on rank 0: JSON-lines metrics, TensorBoard when installed, optional Weights & Biases, progress.

Progress is a tqdm bar only when stderr is a terminal; in a log file (a batch job, ``> log.txt``) each
log window is one plain line instead of carriage-return redraws.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def read_metrics_lines(path: Path) -> list[tuple[str, dict | None]]:
    """Each line of a ``metrics.jsonl`` with its row, or None for a line that is not a row (torn by a kill,
    garbage, a non-integer step); such lines are counted in one warning, never an error that costs a run."""
    path = Path(path)
    if not path.is_file():
        return []
    out, bad = [], 0
    with path.open("rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("step", 0), int) and not isinstance(row.get("step"), bool)
            except (ValueError, RecursionError):
                row, ok = None, False
            if ok:
                row.setdefault("step", 0)
            else:
                bad += line.strip() != ""
            out.append((line, row if ok else None))
    if bad:
        print(f"fastmae: warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return out


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 tensorboard: bool = True, wandb: str = "", config: dict | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._tb = None
        self._wandb = None
        self._bar = None
        self.backends: list[str] = []  # what this run logs to, for the start-up line
        self._warned_wait = False  # the data-wait warning is said once per run (the summary repeats the run's figure)
        if not enabled:
            return
        if tensorboard:
            self._tb = open_tensorboard(self.run_dir / "tb")
            self.backends.append(f"tensorboard: {self.run_dir / 'tb'}" if self._tb is not None
                                 else "tensorboard: off (pip install tensorboard)")
        else:
            self.backends.append("tensorboard: off (--tensorboard=false)")
        if wandb:
            self._wandb = open_wandb(wandb, self.run_dir, config or {})
            self.backends.append(f"wandb: {wandb} ({os.environ.get('WANDB_MODE', 'online')})")
        if progress and _is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        self._plain_progress = progress and self._bar is None

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if row.get("data_wait", 0.0) > DATA_WAIT_WARN and not self._warned_wait:
            self._warned_wait = True
            self.info(data_wait_warning(row["data_wait"], f"the window ending at step {step}"))
        shown = {k: _fmt(row[k]) for k in ("loss", "lr", "img_s") if k in row}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif self._plain_progress:
            pct = 100.0 * step / max(self.total_steps, 1)
            parts = [f"step {step}/{self.total_steps} ({pct:.0f}%)"] + [f"{k} {shown[k]}" for k in ("loss", "lr") if k in shown]
            if "img_s" in shown:
                parts.append(f"{shown['img_s']} img/s")
            if "data_wait" in row:
                parts.append(f"data wait {100 * row['data_wait']:.1f}%")
            print("  ".join(parts), flush=True)

    def resume_at(self, step: int) -> int:
        """Make metrics.jsonl the history of a run resumed at ``step`` (0: a fresh start, nothing kept); returns
        how many rows were dropped.

        Rows logged after the checkpoint by the interrupted run would be logged again (and differently
        timed) by this one, and a SIGKILL may have torn the last line: both go. A ``{"event": "resume"}``
        row marks the seam.
        """
        if not self.enabled:
            return 0
        kept, dropped, last = [], 0, 0
        for line, row in read_metrics_lines(self.metrics_path):
            # In step order only: a row behind one already kept is a duplicate from an earlier timeline.
            if row is not None and last <= row["step"] <= step:
                kept.append(line)
                last = row["step"]
            else:
                dropped += 1
        if step == 0:  # a fresh start (or a run killed before its first checkpoint): its rows begin again
            kept = []
        else:
            kept.append(json.dumps({"event": "resume", "step": step, "time": time.time()}))
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)
        return dropped

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# Above this share of wall time spent waiting for batches, the loader (not the model) sets the pace.
DATA_WAIT_WARN = 0.10


def data_wait_warning(fraction: float, where: str) -> str:
    return (f"warning: the step waited for data {100 * fraction:.1f}% of the time in {where} (above "
            f"{100 * DATA_WAIT_WARN:.0f}%): the input pipeline is the bottleneck; raise --num_workers, use "
            f"--loader=dali, pack the data (fastmae data pack) or use --repeat_samples")


class DataWait:
    """Wraps the step's ``next_batch``: the share of each log window's wall time spent inside it.

    Host clocks only, no device sync: on a GPU the step's kernels are queued asynchronously, so a loader
    that keeps up costs ~0 here while a slow one shows as the host blocking in ``next``. The first
    window (worker start-up, compilation) is reported but left out of the run figure when later windows
    exist, as throughput is."""

    def __init__(self, next_batch):
        self._next = next_batch
        self._wait, self._t0 = 0.0, time.perf_counter()
        self._windows = 0
        self._run_wait = self._run_s = 0.0
        self._first = (0.0, 0.0)

    def __call__(self):
        t = time.perf_counter()
        try:
            return self._next()
        finally:
            self._wait += time.perf_counter() - t

    def close(self) -> float:
        """The fraction of the window since the last close spent waiting for data; starts the next window."""
        now = time.perf_counter()
        wall = max(now - self._t0, 1e-9)
        frac = min(self._wait / wall, 1.0)
        if self._windows:
            self._run_wait += self._wait
            self._run_s += wall
        else:
            self._first = (self._wait, wall)
        self._windows += 1
        self._wait, self._t0 = 0.0, now
        return frac

    def run_fraction(self) -> float | None:
        """Waited / wall over the windows after the first (or the first alone); None before any window closed."""
        wait, wall = (self._run_wait, self._run_s) if self._run_s else self._first
        return wait / wall if wall else None


def open_tensorboard(log_dir: Path):
    """A SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def open_wandb(project: str, run_dir: Path, config: dict):
    """A W&B run in ``project``. ``WANDB_MODE`` (offline, disabled) is wandb's own and is respected as set."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--wandb={project} needs the wandb package (pip install 'fastmae[wandb]'), "
                         f"or drop --wandb") from None
    return wandb.init(project=project, dir=str(run_dir), config=config, name=run_dir.name, resume="allow",
                      id=_wandb_id(run_dir))


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run folder, so a resumed run appends to the same curves."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
