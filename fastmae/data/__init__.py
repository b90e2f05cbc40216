"""Data loading: DALI and torch pipelines, folder and tar sources, sharding, resumable position.

Entry points: :func:`build_loader`, :func:`prepare_demo_dataset`, ``python -m fastmae.data.check DIR``.
Mechanisms (bad input, resume, sharding, GPU/CPU choice) are documented in ``sources.py``,
``loader.py`` and ``dali.py``.
"""

from __future__ import annotations

from .api import build_loader
from .demo import prepare_demo_dataset
from .loader import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["build_loader", "prepare_demo_dataset", "IMAGENET_MEAN", "IMAGENET_STD"]
