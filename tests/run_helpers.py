"""Shared helpers of the tests that drive the training command end to end (faults, trust)."""

from __future__ import annotations

# A run that takes seconds on 2 shared cores: tiny images, one process, checkpoints every 2 steps.
TINY = ["--img_size=32", "--patch_size=4", "--batch_size=8", "--num_workers=0", "--progress=false", "--precision=fp32",
        "--log_every=1", "--ckpt_every=2", "--keep_ckpts=3", "--tensorboard=false"]


def one_error_line(err: str, *needles: str) -> str:
    """The single `fastmae: error:` line of a refused command (warnings aside), holding each needle."""
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("fastmae: error:") and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
