"""``fastmae linprobe``: linear probe of a frozen encoder (MAE protocol: BN without affine + linear, LARS).

Examples:
    fastmae linprobe --ckpt=runs/mae-tiny --output_dir=runs/linprobe
    torchrun --nproc_per_node=8 -m fastmae.cli linprobe --ckpt=mae_pretrain_vit_base.pth --preset=official \
        --data=/data/imagenet --resume=auto
    fastmae linprobe --ckpt=random          # the random-init baseline on the embedded digits
"""

from __future__ import annotations

from fastmae.eval.config import LinprobeConfig
from fastmae.eval.protocol import format_result, run_eval
from fastmae.flags import run_cli

PRESETS: dict[str, dict] = {
    # Tuned for the embedded digits: features are cached, so many epochs cost seconds.
    "digits": {},
    # MAE paper, Table 10: LARS, blr 0.1 at batch 16384 (accumulated), 90 epochs, 10 warmup, no weight decay.
    "official": dict(epochs=90, warmup_epochs=10.0, batch_size=512, eff_batch_size=16384, blr=0.1, weight_decay=0.0,
                     min_lr=0.0, augment="linprobe", eval_batch_size=256),
}


def _body(cfg: LinprobeConfig) -> int:
    r = run_eval(cfg)
    if r.get("status") != "preempted" and r["rank"] == 0:
        print(format_result(r, cfg.output_dir))
    return 0


def main(argv: list[str]) -> int:
    return run_cli(argv, LinprobeConfig, PRESETS, _body, "linprobe", __doc__)
