"""CPU thread defaults that hold on a quiet and on a busy machine.

Two facts make torch's default (one thread per core, OpenMP's default wait policy) fragile on a
shared CPU: OpenMP threads spin-wait between parallel regions, and one thread per core means a core
that another process is using makes every parallel region wait for the slowest, preempted thread.
On a 2-core machine with one core busy the tiny pretraining step ran ~20x slower with 2 threads than
with 1 (bench/bench_threads.py, bench/RESULTS.md "CPU threads"). So:

- :func:`prefer_passive_openmp` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it; libgomp reads it
  once, when torch loads it, so the commands call this before importing torch;
- :func:`resolve_threads` turns ``--threads=0`` into the cores free now: the affinity mask minus the
  1-minute load average, at least 1.
"""

from __future__ import annotations

import os


def prefer_passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless OMP_WAIT_POLICY is already set). Call before ``import torch``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_cores() -> int:
    """Cores of this process's affinity mask not already busy (1-minute load average), at least 1."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return max(1, min(cores, round(cores - load)))


def resolve_threads(requested: int) -> int:
    """``requested`` torch threads, or for 0: OMP_NUM_THREADS when the user set it, else :func:`free_cores`."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return free_cores()
