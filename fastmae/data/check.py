"""``fastmae data check DIR``: list dataset problems before a long run.

Runs the same scan the loaders run (header + end-marker check), optionally a full decode of every
image (``--deep``, catches corrupt entropy data), and prints a report. Exit code 0 when the data set
is clean, 1 when any file would be skipped or a class folder is empty, 2 when it cannot be read at all.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from fastmae.flags import run_cli

from .sources import open_source
from .text import printable


@dataclass
class DataCheckConfig:
    positional: ClassVar[tuple[str, ...]] = ("path",)  # `fastmae data check DIR` = `--path=DIR`
    path: str = field(default="", metadata={"help": "ImageFolder directory or tar shard pattern (also the first argument)"})
    split: str = field(default="", metadata={"help": "train or val; '' = every split present"})
    deep: bool = field(default=False, metadata={"help": "fully decode every image (slow; catches corrupt entropy data)"})
    img_size: int = field(default=224, metadata={"help": "crop size, for the 'smaller than crop' notes"})
    min_size: int = field(default=8, metadata={"help": "images below this many px on a side are bad"})
    show: int = field(default=10, metadata={"help": "list at most this many paths per problem kind"})

    def validate(self) -> None:
        if not self.path:
            raise ValueError("give the data set: fastmae data check DIR (or --path=DIR)")
        if self.split not in ("", "train", "val"):
            raise ValueError(f"split must be train or val, got {self.split!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, DataCheckConfig, {}, check, "data check", __doc__,
                   usage="usage: fastmae data check DIR [--key=value ...]")


def check(args: DataCheckConfig) -> int:
    """Print the report of every split; 0 clean, 1 problems found, 2 unreadable."""
    p = Path(args.path)
    if args.split:
        splits = [args.split]
    elif p.is_dir() and ((p / "train").is_dir() or (p / "val").is_dir()):
        splits = [s for s in ("train", "val") if (p / s).is_dir()]
    else:
        splits = ["train"]
    problems = 0
    for split in splits:
        try:
            src = open_source(args.path, split, min_size=args.min_size, crop=args.img_size, warn=False)
        except (ValueError, FileNotFoundError) as e:
            print(f"[{split}] ERROR: {printable(e)}")
            return 2
        bad = list(src.bad)
        if args.deep:
            for i in range(len(src)):
                try:
                    with Image.open(io.BytesIO(src.read_bytes(i))) as im:
                        im.load()
                except Exception as e:  # every failure is a finding to report, not a crash
                    bad.append((src.names[i], f"decode failed ({type(e).__name__}: {str(e)[:60]})"))
        per_class = Counter(src.labels)
        print(
            f"[{split}] {printable(src.root)}: {len(src) - (len(bad) - len(src.bad))} usable images, "
            f"{len(src.classes)} classes, {len(bad)} bad file(s), {len(src.empty_classes)} empty class folder(s)"
        )
        if src.kind == "folder" and src.classes:
            counts = [per_class.get(i, 0) for i in range(len(src.classes))]
            print(f"[{split}]   images per class: min {min(counts)}, max {max(counts)}")
        for cls in src.empty_classes[: args.show]:
            print(f"[{split}]   EMPTY class folder: {printable(cls)}")
        for path, why in bad[: args.show]:
            print(f"[{split}]   BAD {printable(path)}: {printable(why)}")
        if len(bad) > args.show:
            print(f"[{split}]   ... and {len(bad) - args.show} more bad file(s)")
        kinds = Counter(n.split(" (")[0] for _, note in src.notes for n in note.split("; "))
        for kind, n in sorted(kinds.items()):
            print(f"[{split}]   note: {n} image(s): {printable(kind)} (handled by the loaders)")
        problems += len(bad) + len(src.empty_classes)
    print("OK: no problems found" if problems == 0 else f"FOUND {problems} problem(s)")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
