"""Data loading: DALI and torch pipelines for images and video clips, folder and tar sources,
sharding, resumable position.

Entry points: :func:`build_loader` (images), :func:`build_video_loader` (clips),
:func:`prepare_demo_dataset`, :func:`demo_cache_dir`, ``python -m fastmae.data.check DIR``.
Mechanisms (bad input, resume, sharding, GPU/CPU choice) are documented in ``sources.py``,
``loader.py``, ``dali.py`` and ``video.py``.
"""

from __future__ import annotations

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .api import build_loader, build_video_loader
from .demo import demo_cache_dir, prepare_demo_dataset
from .text import printable

__all__ = [
    "build_loader",
    "build_video_loader",
    "prepare_demo_dataset",
    "demo_cache_dir",
    "printable",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
