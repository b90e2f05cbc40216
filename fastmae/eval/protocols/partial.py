"""Partial fine-tuning: the last k blocks, the final norm and the head train (MAE, Fig. 9); the frozen
prefix runs without keeping activations."""

from fastmae.eval.finetune import PRESETS, FinetuneConfig
from fastmae.eval.protocol import run_eval
from fastmae.eval.protocols.registry import ProtocolSpec, register_protocol

register_protocol(ProtocolSpec(
    name="partial", help="fine-tune the last --tune_blocks blocks (default 1)", config=FinetuneConfig,
    presets={name: {"tune_blocks": 1, **p} for name, p in PRESETS.items()}, run=run_eval,
    demo=("partial fine-tune (last block)", "partial_epochs", {"tune_blocks": 1}), tune_blocks=lambda k: k > 0))
