"""Constants shared across fastmae: pixel normalization and the file types the loaders read.

One place, so the model's normalization, the loaders' and the evaluation's can never drift apart.
"""

from __future__ import annotations

# ImageNet channel statistics (RGB, on pixels scaled to [0, 1]); the official MAE normalizes with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# File suffixes (lower case) read as images by every loader, scan and evaluation command.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")

# File suffixes read as video clips.
VIDEO_EXTENSIONS = (".webm", ".mkv", ".avi", ".mp4", ".mov")
