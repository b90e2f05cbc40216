"""Full fine-tuning: AdamW with layer-wise lr decay, drop path, label smoothing, mixup/cutmix (MAE, Table 9)."""

from fastmae.eval.finetune import PRESETS, FinetuneConfig
from fastmae.eval.protocol import run_eval
from fastmae.eval.protocols.registry import ProtocolSpec, register_protocol

register_protocol(ProtocolSpec(
    name="finetune", help="full fine-tuning (layer-wise lr decay, drop path, mixup/cutmix)", config=FinetuneConfig,
    presets=PRESETS, run=run_eval, demo=("full fine-tune", "finetune_epochs", {"tune_blocks": -1}),
    tune_blocks=lambda k: k < 0))
