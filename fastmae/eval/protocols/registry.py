"""The evaluation-protocol registry: every protocol is one :class:`ProtocolSpec`, looked up by name.

The evaluation commands, ``fastmae sweep`` and ``fastmae demo-eval`` ask the registry which protocols exist,
which configuration and presets each takes and how to run it; they never branch on ``tune_blocks``.

Built-in protocols live one per module in :data:`BUILTIN_PROTOCOLS` and are imported on first use.

Adding a protocol:
1. write ``fastmae/eval/protocols/<name>.py``: its config (an ``EvalConfig`` subclass: its defaults through
   ``flags.section`` / ``flags.default``, its own keys in a section subclass such as ``KnnProtocol``), presets, a
   ``run(cfg, split=None, source_sd=None, source_meta=None) -> dict`` returning the summary (``top1``,
   ``top5``, ``top1_last``, ``epoch``, ``reported``, ``wall_s``, ``status``), and one
   ``register_protocol(ProtocolSpec(...))`` line at the end;
2. add ``"fastmae.eval.protocols.<name>"`` to :data:`BUILTIN_PROTOCOLS`;
3. add its tests (against an independent reference, and a short run).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

BUILTIN_PROTOCOLS = ("fastmae.eval.protocols.linprobe", "fastmae.eval.protocols.partial",
                     "fastmae.eval.protocols.finetune", "fastmae.eval.protocols.video", "fastmae.eval.protocols.knn")

_PROTOCOLS: dict[str, ProtocolSpec] = {}


@dataclass(frozen=True)
class ProtocolSpec:
    """name: ``--protocol=<name>``. config/presets: its ``--key=value`` configuration. run: trains (or not) and
    scores. frozen: the encoder never changes (features can be computed once). images: it runs on the image
    splits (sweeps and the demo). demo: (row label, the ``DemoConfig`` key of its epochs or "", config overrides)
    for ``fastmae demo-eval``, or None. tune_blocks: the ``--tune_blocks`` values it stands for (``finetune
    --tune_blocks=k`` runs the protocol whose predicate accepts k)."""

    name: str
    help: str
    config: type
    presets: dict
    run: Callable[..., dict]
    frozen: bool = False
    images: bool = True
    demo: tuple[str, str, dict] | None = None
    tune_blocks: Callable[[int], bool] = field(default=lambda k: False)


def register_protocol(spec: ProtocolSpec) -> ProtocolSpec:
    """Make ``spec`` available under ``spec.name``; a name can be registered once."""
    if spec.name in _PROTOCOLS:
        raise ValueError(f"protocol {spec.name!r} is already registered")
    _PROTOCOLS[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for module in BUILTIN_PROTOCOLS:
        importlib.import_module(module)


def list_protocols() -> list[str]:
    _load_builtins()
    return list(_PROTOCOLS)


def get_protocol(name: str) -> ProtocolSpec:
    _load_builtins()
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(_PROTOCOLS)}")
    return _PROTOCOLS[name]


def protocol_for(tune_blocks: int) -> ProtocolSpec:
    """The protocol a ``--tune_blocks`` value selects (0: linear probe, k > 0: partial, < 0: full fine-tuning)."""
    _load_builtins()
    for spec in _PROTOCOLS.values():
        if spec.tune_blocks(tune_blocks):
            return spec
    raise ValueError(f"no protocol takes tune_blocks={tune_blocks}")
