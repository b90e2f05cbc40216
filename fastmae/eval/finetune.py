"""``fastmae finetune``: full (``--tune_blocks=-1``) or partial (last k blocks) fine-tuning; k = 0 is the linear probe.

Full fine-tuning follows MAE: AdamW, layer-wise lr decay, drop path, label
smoothing, mixup/cutmix (timm), optional global pooling with fc_norm. The
``official_*`` presets are the paper's recipes (Table 9 / the official fine-tuning
README); every key stays overridable. Data streams through fastmae.data
(``--data=ROOT`` with train/ and val/, or ``--train_data``/``--val_data``, folders
or tar shards); without ``--data`` the embedded digits demo runs in memory.

Examples:
    fastmae finetune --ckpt=runs/mae-tiny                  # full, digits
    fastmae finetune --ckpt=runs/mae-tiny --tune_blocks=1  # partial
    torchrun --nproc_per_node=8 -m fastmae.cli finetune --ckpt=mae_pretrain_vit_base.pth --preset=official_base \
        --data=/data/imagenet --resume=auto
    fastmae finetune --eval_only=true --ckpt=runs/finetune/checkpoint-last.pt --data=/data/imagenet
"""

from __future__ import annotations

from fastmae.eval import linprobe
from fastmae.eval.config import FinetuneConfig
from fastmae.eval.protocol import format_result, run_eval
from fastmae.flags import parse_flags, run_cli

_OFFICIAL = dict(warmup_epochs=5.0, batch_size=128, eff_batch_size=1024, weight_decay=0.05, smoothing=0.1, mixup=0.8,
                 cutmix=1.0, global_pool=True, learn_pos_embed=True, min_lr=1e-6, augment="finetune", eval_batch_size=256)
PRESETS: dict[str, dict] = {
    "digits": {},
    # MAE paper Table 9 / official FINETUNE.md: lr = blr x 1024 / 256, layer decay, drop path per model size.
    "official_base": dict(_OFFICIAL, epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    "official_large": dict(_OFFICIAL, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "official_huge": dict(_OFFICIAL, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}


def _body(cfg: FinetuneConfig) -> int:
    r = run_eval(cfg)
    if r.get("status") != "preempted" and r["rank"] == 0:
        print(format_result(r, cfg.output_dir))
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
    from fastmae.eval.protocols import get_protocol

    try:
        k = parse_flags(argv, FinetuneConfig, PRESETS).protocol.tune_blocks
    except ValueError:
        k = None  # run_cli reports it
    if k is not None and get_protocol("linprobe").tune_blocks(k):
        # The linear probe's value: the same protocol and defaults as `fastmae linprobe`.
        return linprobe.main(_without_tune_blocks(argv))
    return run_cli(argv, FinetuneConfig, PRESETS, _body, "finetune", __doc__)
