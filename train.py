"""MAE pretraining. ``python train.py`` runs the embedded CPU demo; ``--preset=base`` is the official ViT-B recipe.

The loop itself reads top to bottom in ``fastmae/pretrain.py`` (config -> data ->
model -> compile -> step loop -> log/checkpoint); it lives in the package so that
``fastmae pretrain`` runs the same code from an installed wheel.

    python train.py [--preset=tiny] [--key=value ...]
    torchrun --nproc_per_node=8 train.py --preset=base --data=/path/to/imagenet
"""

import sys

from fastmae.threads import prefer_passive_openmp

if __name__ == "__main__":
    prefer_passive_openmp()  # before torch loads OpenMP
    from fastmae.pretrain import cli_main

    sys.exit(cli_main())
