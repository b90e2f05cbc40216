"""Every command in README.md's ```bash blocks runs as written, at tiny size.

What runs here instead of the literal line, and why:
- setup (``python3 -m venv``, ``pip install``) is not rerun: CI's ``.ci/run`` is that very line (checked
  below), and this test runs inside the environment it made; ``. .venv/bin/activate`` is a no-op here
  because ``python``, ``fastmae`` and ``torchrun`` already resolve to this interpreter's environment;
- ``pytest ...`` is the suite this test belongs to;
- ``bash .ci/refresh-lock`` installs gigabytes and runs this whole suite: ``tests/test_lock.py`` runs that
  script with stand-ins for python3/pip/pytest;
- :data:`SUBSTITUTIONS`: data and files a user has and this machine has not (a generated class-folder
  tree for ``/data/imagenet``, generated images for ``photos/``, the main job's run folder for the official
  ``mae_pretrain_vit_base.pth``);
- lines that need GPUs must say so (``# GPU`` in the line's comment) and run as ``--dry_run`` (the plan;
  ``torchrun --nproc_per_node=N`` becomes ``--world_size=N``); a GPU-size line that does not say GPU fails;
- CPU training lines run 2 optimizer steps (:data:`TINY_TRAIN`), evaluation commands 1 epoch (:data:`TINY`).
Each block runs top to bottom in one folder in which the main job (the first block) has run.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"

SUBSTITUTIONS = {
    "/data/imagenet": "{imagenet}",
    "photos/": "{photos}",
    "mae_pretrain_vit_base.pth": "runs/mae-tiny",
}
TINY_TRAIN = ["--max_steps=2", "--log_every=1", "--no_progress", "--no_tensorboard", "--num_workers=0"]
TINY = {
    "linprobe": ["--epochs=1", "--batch_size=8", "--eval_batch_size=8"],
    "finetune": ["--epochs=1", "--batch_size=8", "--eval_batch_size=8"],
    "analyze": ["--num_images=8"],
    "demo-eval": ["--preset=smoke"],
    "sweep": ["--pretrain_epochs=1", "--epochs=1"],
}
GPU_PRESETS = re.compile(r"--preset=(base|large|huge|\w+_vit_\w+)\b")
TIMEOUT = 600


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, commands) of every ```bash block; ``\\`` continuations joined, comment-only lines dropped."""
    blocks, current, start, pending = [], None, 0, ""
    for n, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], n + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            current.append(pending + line.strip() if pending else line)
            pending = ""
    return blocks


def _segments(tokens: list[str]) -> list[list[str]]:
    out, seg = [], []
    for t in tokens:
        if t == "&&":
            out.append(seg)
            seg = []
        else:
            seg.append(t)
    return out + [seg]


def plan(line: str, places: dict[str, str]) -> list[list[str]]:
    """The argv lists that stand for one README line here (empty: nothing to run, see the module doc)."""
    gpu = bool(re.search(r"#.*\bGPU\b", line))
    for text, stand_in in SUBSTITUTIONS.items():
        line = line.replace(text, stand_in.format(**places))
    runs = []
    for seg in _segments(shlex.split(line, comments=True)):
        if seg[:3] == ["python3", "-m", "venv"] or "install" in seg and any(t.endswith("pip") for t in seg):
            continue
        if seg[0] in (".", "source") and seg[1].endswith("bin/activate"):
            continue
        seg = [t.removeprefix(".venv/bin/") if t.startswith(".venv/bin/") else t for t in seg]
        if "pytest" in seg[:3]:
            continue
        if seg[:2] == ["bash", ".ci/refresh-lock"]:
            continue
        runs.append(_sized(seg, gpu, line))
    return runs


def _target(seg: list[str]) -> tuple[int, str, list[str]]:
    """(torchrun processes or 0, fastmae command, its arguments) of a python/fastmae/torchrun line.

    ``train.py`` lines keep their script: the command is then ``train.py`` (the same program as ``pretrain``)."""
    nproc = 0
    if seg[0] == "torchrun":
        launcher = list(itertools.takewhile(lambda t: t.startswith("--"), seg[1:]))
        nproc = int(next((t.split("=")[1] for t in launcher if t.startswith("--nproc_per_node=")), "1"))
        seg = ["python", *seg[1 + len(launcher):]]
    if seg[0] == "fastmae":
        rest = seg[1:]
    elif seg[0] == "python" and seg[1:3] == ["-m", "fastmae.cli"]:
        rest = seg[3:]
    elif seg[0] == "python" and seg[1] == "train.py":
        return nproc, "train.py", seg[2:]
    else:
        return nproc, "", seg
    if seg[0] != "python" and nproc:
        raise AssertionError(f"unexpected torchrun line: {shlex.join(seg)}")
    command = " ".join(rest[:2]) if rest[:2] == ["data", "check"] else rest[0]
    return nproc, command, rest[len(command.split()):]


def _sized(seg: list[str], gpu: bool, line: str) -> list[str]:
    nproc, command, args = _target(seg)
    if not command:
        return _bench_script(seg, gpu)
    training = command in ("pretrain", "train.py")
    if "--help" in args or "--dry_run" in args:
        return _launch(0, command, args)
    if training and (nproc > 2 or GPU_PRESETS.search(line)):
        assert gpu, f"README line needs GPUs but does not say so (# GPU ...): {line}"
    if gpu and training:
        from fastmae.config import parse_overrides

        cfg = parse_overrides(args)  # bad keys or values fail here, whatever the method
        if cfg.method.name != "mae":  # the plan models MAE runs only: the parsed config is the check
            return [sys.executable, "-c", "pass"]
        return _launch(0, command, [*args, *([f"--world_size={nproc}"] if nproc else []), "--dry_run"])
    tiny = TINY_TRAIN if training else TINY.get(command, [])
    return _launch(min(nproc, 2), command, [*args, *tiny])


def _bench_script(seg: list[str], gpu: bool) -> list[str]:
    """``python bench/X.py ...`` runs the repository's script; a GPU report line runs its CPU twin, environment only."""
    if seg[0] != "python" or len(seg) < 2 or not seg[1].startswith("bench/"):
        return seg
    args = [*seg[2:], "--quick", "--sections", "env", "--out", "gpu-report"] if gpu else seg[2:]
    return [sys.executable, str(ROOT / seg[1]), *args]


def _launch(nproc: int, command: str, args: list[str]) -> list[str]:
    """This interpreter (the README's environment) running ``fastmae COMMAND ARGS``; torchrun as 2 CPU processes (gloo)."""
    program = ["train.py"] if command == "train.py" else ["-m", "fastmae.cli", *command.split()]
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *program, *args]
    return [sys.executable, *program, *args]


def _image_tree(root: Path, splits: dict[str, int], size=(72, 80)) -> None:
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = rng.integers(0, 255, (1, 1, 3))
                img = np.clip(base + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}{c}_{i:02d}.jpg")


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out like the repository checkout (train.py), with the stand-in data and the main job run."""
    ws = tmp_path_factory.mktemp("readme")
    (ws / "train.py").symlink_to(ROOT / "train.py")
    _image_tree(ws / "imagenet", {"train": 12, "val": 4})
    _image_tree(ws / "photos-tree", {"x": 1})
    (ws / "photos-tree" / "x" / "class0").rename(ws / "photos")
    places = {"imagenet": str(ws / "imagenet"), "photos": str(ws / "photos")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTMAE_CACHE": str(ws / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    first_line, first = bash_blocks(README.read_text())[0]
    results = [(first[0], argv, _run(argv, ws, env)) for argv in plan(first[0], places)]
    return ws, places, env, (first_line, results)


def _report(failures: list[str]) -> None:
    assert not failures, "\n\n".join(failures)


def _failure(line: str, argv: list[str], r: subprocess.CompletedProcess) -> str:
    return f"README: {line.strip()}\nran: {shlex.join(argv)}\nexit {r.returncode}\n{(r.stdout + r.stderr)[-2500:]}"


BLOCKS = bash_blocks(README.read_text())


@pytest.mark.parametrize("start,lines", BLOCKS[1:], ids=[f"line{s}" for s, _ in BLOCKS[1:]])
def test_readme_block_runs(start, lines, workspace):
    ws, places, env, _ = workspace
    failures = []
    for line in lines:
        for argv in plan(line, places):
            r = _run(argv, ws, env)
            if r.returncode != 0:
                failures.append(_failure(line, argv, r))
    _report(failures)


def test_main_job_runs_and_says_what_it_did(workspace):
    ws, _, _, (line_no, results) = workspace
    assert results, f"the first README block (line {line_no}) runs nothing"
    _report([_failure(line, argv, r) for line, argv, r in results if r.returncode != 0])
    out = results[-1][2].stdout
    assert "held-out loss" in out and "the data set's val split" in out
    for name in ("config.json", "summary.json", "curves.png", "reconstructions.png", "reconstructions.json"):
        assert (ws / "runs" / "mae-tiny" / name).is_file(), name


def test_setup_line_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1].strip()
    assert any(ci in lines for _, lines in BLOCKS), "README's test command and .ci/run differ"


def test_gpu_lines_must_say_so():
    places = {"imagenet": "IMAGENET", "photos": "PHOTOS"}
    with pytest.raises(AssertionError, match="does not say so"):
        plan("torchrun --nproc_per_node=8 train.py --preset=base --data=/data/imagenet", places)
    argv = plan("torchrun --nproc_per_node=8 train.py --preset=base --data=/data/imagenet   # GPU: DDP", places)[0]
    assert argv == [sys.executable, "train.py", "--preset=base", "--data=IMAGENET", "--world_size=8", "--dry_run"]
    assert plan(". .venv/bin/activate", places) == []
    setup = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python train.py"
    assert plan(setup, places) == [[sys.executable, "train.py", *TINY_TRAIN]]
    # torchrun of any command: 2 CPU processes; `-m fastmae.cli` is the same program as `fastmae`.
    argv = plan("torchrun --nproc_per_node=8 -m fastmae.cli linprobe --ckpt=mae_pretrain_vit_base.pth", places)[0]
    assert argv[3:] == ["--standalone", "--nproc_per_node=2", "-m", "fastmae.cli", "linprobe", "--ckpt=runs/mae-tiny",
                        *TINY["linprobe"]]
    text = "```bash\nfastmae finetune --ckpt=x \\\n    --data=y   # z\n                # comment only\n```\n"
    assert bash_blocks(text) == [(2, ["fastmae finetune --ckpt=x --data=y   # z"])]
