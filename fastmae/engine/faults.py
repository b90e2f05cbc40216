"""Fault injection for the crash, preemption and bad-loss tests.

``FASTMAE_FAULT`` holds one spec:
- ``after_step@K`` / ``during_save@K``: the process kills itself with SIGKILL
  right after optimizer step K completes / while writing checkpoint K;
- ``nan_loss@K`` or ``nan_loss@K+``: the loss of the step that starts with K
  steps completed (and, with ``+``, of every later one) is replaced by NaN;
- ``disk_full@K``: writing checkpoint K fails after 4 KiB with ENOSPC, raised by
  the file object torch.save writes to (torch's own error path runs as on a full disk).
Unset, every call costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

import torch

_current_step = -1


def set_step(step: int) -> None:
    global _current_step
    _current_step = step


def active(name: str) -> bool:
    spec = os.environ.get("FASTMAE_FAULT")
    if not spec:
        return False
    where, _, at = spec.partition("@")
    if where != name:
        return False
    if at.endswith("+"):
        return _current_step >= int(at[:-1])
    return _current_step == int(at)


def point(name: str) -> None:
    if active(name):
        os.kill(os.getpid(), signal.SIGKILL)


def poison(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan") if active("nan_loss") else loss
