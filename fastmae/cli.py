"""The ``fastmae`` command: one subcommand per job, each a ``main(argv) -> int`` imported on demand.

Bad configuration surfaces as a one-line ``fastmae: error: ...`` and exit
code 2, never a traceback; failures during a run keep their traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from fastmae.threads import prefer_passive_openmp

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("fastmae.pretrain", "cli_main", "MAE/SimMIM/VideoMAE pretraining (what train.py runs)"),
    "plan": ("fastmae.plan", "main", "what a run resolves to on a target GPU setup (= pretrain --dry_run)"),
    "data check": ("fastmae.data.check", "main", "list a dataset's problems (corrupt, unreadable, too small) before a long run"),
    "data pack": ("fastmae.data.pack", "main", "webdataset shards at a bounded short side + JSON index (fast loading)"),
    "linprobe": ("fastmae.eval.linprobe", "main", "linear probe of a pretrained encoder"),
    "finetune": ("fastmae.eval.finetune", "main", "partial (--tune_blocks k) or full fine-tuning"),
    "knn": ("fastmae.eval.protocols.knn", "main", "k-NN top-1 of a frozen encoder (cosine, temperature-weighted vote)"),
    "analyze": ("fastmae.eval.analyze", "main", "attention distance, entropy and head diversity per layer"),
    "visualize": ("fastmae.eval.visualize", "main", "reconstruction grids for images and a checkpoint"),
    "export": ("fastmae.export", "main", "a checkpoint as a transformers (ViTMAE) or timm model folder"),
    "submit": ("fastmae.submit", "main", "a Slurm job around torchrun: requeued on time limit/preemption, resumes itself"),
    "demo-eval": ("fastmae.eval.demo", "main", "pretrain on digits, then probe / fine-tune vs random init"),
    "sweep": ("fastmae.eval.sweep", "main", "one evaluation per value of a key (tune_blocks, mask_ratio, ...): CSV + curve"),
    "finetune-video": ("fastmae.eval.video", "main", "VideoMAE fine-tuning on clip folders, multi-view clip-level top-1"),
}

# commands that train: SIGTERM is a preemption notice from the start (their loops then save and exit 0)
TRAINING_COMMANDS = ("pretrain", "linprobe", "finetune", "finetune-video", "sweep", "demo-eval")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fastmae <command> [--key=value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands such as `data check`
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"fastmae: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if name in TRAINING_COMMANDS:
        # Preempted while importing and setting up: nothing to save yet, leave cleanly (as train.py does).
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    prefer_passive_openmp()  # before the command imports torch
    try:
        entry = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"fastmae: error: command {name!r} is not available in this installation ({e})", file=sys.stderr)
        return 2
    rc = int(entry(rest) or 0)
    if name in TRAINING_COMMANDS:
        # Done and saved: a SIGTERM from here on must not turn the exit code into death by signal (Python restores
        # the default action of signals with Python handlers while it shuts down; an ignored one stays ignored).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return rc


if __name__ == "__main__":
    sys.exit(main())
