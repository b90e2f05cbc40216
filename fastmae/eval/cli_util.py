"""Shared command-line plumbing of the evaluation commands: ``--key=value`` parsing and the error contract."""

from __future__ import annotations

import sys
from collections.abc import Callable

from fastmae.flags import help_text, parse_flags


def run_cli(argv: list[str], cls, presets: dict[str, dict], body: Callable, prog: str, doc: str) -> int:
    """Parse ``argv`` into ``cls`` and call ``body(cfg)``.

    Bad configuration and bad input (ValueError, FileNotFoundError) print one
    ``fastmae: error:`` line (plus any listed details, e.g. mismatching keys) and return 2.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(argv, cls, presets, f"usage: fastmae {prog} [--key=value ...]", doc))
        return 0
    try:
        cfg = parse_flags(argv, cls, presets)
        return int(body(cfg) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
