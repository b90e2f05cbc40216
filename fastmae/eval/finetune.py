"""``fastmae finetune``: full (``--tune_blocks=-1``) or partial (last k blocks) fine-tuning; k = 0 is the linear probe.

Full fine-tuning follows MAE: AdamW, layer-wise lr decay, drop path, label
smoothing, mixup/cutmix (timm), optional global pooling with fc_norm.

Examples:
    fastmae finetune --ckpt=runs/pretrain/checkpoint-00001000.pt                  # full, digits
    fastmae finetune --ckpt=runs/pretrain/checkpoint-00001000.pt --tune_blocks=1  # partial
    fastmae finetune --ckpt=mae_pretrain_vit_base.pth --preset=official --data=/data/subset
"""

from __future__ import annotations

from dataclasses import dataclass

from fastmae.config import parse_overrides
from fastmae.eval import linprobe
from fastmae.eval.cli_util import run_cli
from fastmae.eval.protocol import EvalConfig, run_eval


@dataclass
class FinetuneConfig(EvalConfig):
    output_dir: str = "runs/finetune"
    tune_blocks: int = -1
    epochs: int = 30
    warmup_epochs: float = 3.0
    batch_size: int = 128
    blr: float = 2e-3
    layer_decay: float = 0.75
    drop_path: float = 0.1
    smoothing: float = 0.1


PRESETS: dict[str, dict] = {
    "digits": {},
    # MAE paper, Table 9 (ViT-B): blr 5e-4 at batch 1024, 100 epochs, 5 warmup, decay 0.65, drop path 0.1.
    "official": dict(epochs=100, warmup_epochs=5.0, batch_size=1024, blr=5e-4, layer_decay=0.65, drop_path=0.1,
                     smoothing=0.1, mixup=0.8, cutmix=1.0, weight_decay=0.05, global_pool=True,
                     learn_pos_embed=True),
}


def _body(cfg: FinetuneConfig) -> int:
    r = run_eval(cfg)
    print(f"{r['protocol']} top-1: best {r['best_acc']:.4f} (epoch {r['best_epoch']}), last {r['last_acc']:.4f}; "
          f"chance {r['chance']:.3f}; {r['wall_s']:.1f}s; wrote {cfg.output_dir}")
    return 0


def _without_tune_blocks(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a[2:].partition("=")[0].replace("-", "_") if a.startswith("--") else ""
        if key == "tune_blocks":
            skip = "=" not in a
            continue
        out.append(a)
    return out


def main(argv: list[str]) -> int:
    try:
        k = parse_overrides(argv, cls=FinetuneConfig, presets=PRESETS).tune_blocks
    except ValueError:
        k = None  # run_cli reports it
    if k == 0:
        # k = 0 is the linear probe: the same protocol and defaults as `fastmae linprobe`.
        return linprobe.main(_without_tune_blocks(argv))
    return run_cli(argv, FinetuneConfig, PRESETS, _body, "finetune", __doc__)
