"""Run logging: JSON-lines metrics, TensorBoard when installed, a tqdm progress bar on rank 0."""

from __future__ import annotations

import json
import os
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

    def resume_at(self, step: int) -> int:
        """Make metrics.jsonl the history of a run resumed at ``step``; returns how many rows were dropped.

        Rows logged after the checkpoint by the interrupted run would be logged again (and differently
        timed) by this one, and a SIGKILL may have torn the last line: both go. A ``{"event": "resume"}``
        row marks the seam.
        """
        if not self.enabled:
            return 0
        kept, dropped = [], 0
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
                except (ValueError, TypeError):
                    keep = False
                if keep:
                    kept.append(line)
                else:
                    dropped += 1
        kept.append(json.dumps({"event": "resume", "step": step, "time": time.time()}))
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(kept) + "\n")
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
        if self._tb is not None:
            self._tb.close()


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
