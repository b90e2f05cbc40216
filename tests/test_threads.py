"""CPU thread defaults: free cores from affinity and load, the user's settings win, OpenMP set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

from fastmae import threads


def test_free_cores_from_affinity_and_load(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for load, want in ((0.1, 2), (0.9, 1), (1.4, 1), (6.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert threads.resolve_threads(0) == want, load
    assert threads.resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.resolve_threads(0) == 2


def test_passive_wait_policy_only_when_unset(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prefer_passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prefer_passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_command_does_not_load_torch_before_choosing():
    probe = "import sys, fastmae.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
