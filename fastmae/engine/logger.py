"""Run logging: JSON-lines metrics, TensorBoard when installed, a tqdm progress bar on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:
            self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(row[k]) for k in ("loss", "lr", "img_s") if k in row}, refresh=False)

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
        if self._tb is not None:
            self._tb.close()


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
