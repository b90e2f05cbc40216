"""Linear probe: frozen encoder, ``BatchNorm1d(affine=False)`` + linear head, LARS (MAE, Table 10).

On in-memory data (no augmentation) the frozen features are computed once and the head trains on them."""

from fastmae.eval.linprobe import PRESETS, LinprobeConfig
from fastmae.eval.protocol import run_eval
from fastmae.eval.protocols.registry import ProtocolSpec, register_protocol

register_protocol(ProtocolSpec(
    name="linprobe", help="linear probe of the frozen encoder (BN + linear, LARS)", config=LinprobeConfig,
    presets=PRESETS, run=run_eval, frozen=True, demo=("linear probe", "probe_epochs", {}),
    tune_blocks=lambda k: k == 0))
