"""MAE pretraining. ``python train.py`` runs the embedded CPU demo; ``--preset=base`` is the official ViT-B recipe.

The loop itself reads top to bottom in ``fastmae/pretrain.py`` (config -> data ->
model -> compile -> step loop -> log/checkpoint); it lives in the package so that
``fastmae pretrain`` runs the same code from an installed wheel.

    python train.py [--preset=tiny] [--key=value ...]
    torchrun --nproc_per_node=8 train.py --preset=base --data=/path/to/imagenet
"""

import os
import signal
import sys

from fastmae.threads import prefer_passive_openmp

if __name__ == "__main__":
    # Preempted while still importing and setting up: nothing to save yet, so leave at once with exit 0
    # (os._exit: a SystemExit raised inside torch's import can leave the interpreter waiting at shutdown).
    # The training loop installs its own handler (save at an agreed step) before it starts.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    prefer_passive_openmp()  # before torch loads OpenMP
    from fastmae.pretrain import cli_main

    sys.exit(cli_main())
