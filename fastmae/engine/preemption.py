"""SIGTERM as a preemption notice: the loop finishes its step, saves a checkpoint and exits cleanly.

Preemption comes in three forms, all handled the same way: SIGTERM to the main process, to its whole
process group (SLURM, ``scancel``: the DataLoader workers get it too and ignore it, see
``fastmae.data.loader.ignore_sigterm``), or to ``torchrun``, which forwards it to every rank and
SIGKILLs them after a grace period (30 s).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

from fastmae.engine.distributed import DistInfo

# Under the run folder, one file per rank after a clean preemption save. torchrun exits 1 after it forwards a
# SIGTERM (its SignalException) however cleanly the ranks saved; a launcher (``fastmae submit``'s batch script)
# reads these files instead of torchrun's exit code.
SAVED_DIR = "preempted"


def mark_saved(run_dir: Path, rank: int, step: int) -> None:
    """Record that this rank's part of the preemption checkpoint at ``step`` is done (rank 0: written to disk)."""
    folder = Path(run_dir) / SAVED_DIR
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{rank}").write_text(f"{step}\n")


class Preemption:
    """Context manager: inside it, SIGTERM sets :attr:`requested` instead of killing the process.

    :meth:`stop_now` is asked once per optimizer step and answers the same on every rank.
    Ranks must agree: SIGTERM reaches them at different moments (or reaches only one), and a rank that
    saved and left while another kept stepping would hang the next collective. Each step every rank
    posts its flag to an all-reduce (MAX) and reads the result of the one it posted the step before, so
    all ranks see the same vote after the same step and stop one step after the earliest flag. The vote
    runs on a gloo group over CPU tensors: a collective between the hosts, overlapped with a step of
    work, never a device sync. (Piggybacking on the log-window sync would cost nothing extra but could
    stop up to ``log_every`` steps late, past the grace period on slow steps.) On multi-node jobs gloo must
    use the interface between the nodes: ``GLOO_SOCKET_IFNAME`` (taken from ``NCCL_SOCKET_IFNAME`` when only that
    is set, :func:`fastmae.engine.distributed.configure_rank_env`).
    """

    def __init__(self, info: DistInfo | None = None):
        self.requested = False
        self._previous = None
        self._distributed = info is not None and info.enabled
        self._group = None
        self._pending: tuple | None = None
        if self._distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a collective: every rank constructs it, in the same order

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def stop_now(self) -> bool:
        """True when the run must save and stop after the step just completed (the same on every rank)."""
        if not self._distributed:
            return self.requested
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())  # a CPU tensor: no device sync
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        # Every rank posted as many votes: completing the last one leaves no collective in flight.
        if self._pending is not None and exc[0] is None:
            self._pending[0].wait()
        self._pending = None
        signal.signal(signal.SIGTERM, self._previous)
