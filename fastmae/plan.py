"""``fastmae plan`` (= ``fastmae pretrain --dry_run``): what a run would resolve to on its target, without a GPU.

Every pretrain key is accepted, plus ``--world_size=N``, ``--gpu=NAME`` and ``--device=cuda``; the model
behind the numbers (memory, roofline, layout) is :mod:`fastmae.engine.plan`.
"""

from __future__ import annotations

import sys

import torch

from fastmae.config import describe_keys, parse_overrides
from fastmae.engine.flops import GPUS
from fastmae.engine.plan import build_plan, format_plan, trace_step
from fastmae.methods.registry import get_method
from fastmae.models.mae import MaskedAutoencoderViT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: fastmae plan [--preset=NAME] [--device=cuda] [--world_size=N] [--gpu={'|'.join(GPUS)}] "
              f"[--key=value ...]\n\nkeys:\n{describe_keys()}")
        return 0
    try:
        cfg = parse_overrides(argv)
        spec = get_method(cfg.method.name)
        with torch.device("meta"):
            model = spec.build_model(cfg)
        trace = None
        if not isinstance(model, MaskedAutoencoderViT):  # MAE has its shape model; any other method is traced
            size = cfg.data.img_size
            sample = (3, cfg.method.num_frames, size, size) if spec.unit == "clips" else (3, size, size)
            trace = trace_step(lambda: spec.build_model(cfg), sample, cfg.model.mask_ratio)
        plan = build_plan(cfg, model, spec.flops_per_image(model, cfg), trace)
    except ValueError as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
