"""``fastmae sweep``: one evaluation per value of a key; a CSV and a curve (top-1 vs the value).

``--values="KEY=v1,v2,..."`` names the swept key:

- a protocol key (``tune_blocks``, ``epochs``, ``blr``, ``drop_path``, ...): the
  protocol (``--protocol=`` a registered image protocol, a comma list, or
  ``both``) runs once per value.
  ``tune_blocks=0`` is the linear probe (its own recipe, as with ``fastmae
  finetune --tune_blocks=0``), so ``tune_blocks=0,1,2,4,12`` is the paper's
  partial fine-tuning curve.
- a pretraining key (``mask_ratio``, ``norm_pix_loss``, ...): one pretraining
  per value, then the linear probe and fine-tuning of each encoder. On the
  digits demo (no ``--data``) the demo's tiny MAE pretrains in memory
  (``fastmae demo-eval``'s model and keys, e.g. ``--pretrain_epochs``); with
  data, ``fastmae pretrain`` runs with ``--pretrain_args`` plus the key.

Any other ``--key=value`` goes to both protocols; ``--linprobe.key=value`` or
``--finetune.key=value`` to one. Every value runs in its own directory
(``OUTPUT/KEY=VALUE/...``); a finished value (its ``results.json`` exists) is
not rerun, so an interrupted sweep continues where it stopped. The reported
number is each run's headline (the last epoch's, or the epoch chosen on a
validation split carved from the training data), never a best-on-test pick.

Examples:
    fastmae sweep --protocol=finetune --values="tune_blocks=0,1,2,4" --ckpt=runs/demo_eval/mae_pretrained.pt
    fastmae sweep --protocol=both --values="mask_ratio=0.4,0.6,0.75,0.9" --pretrain_epochs=60
    fastmae sweep --values="decoder_depth=1,2,4,8" --method=crossmae --output_dir=runs/sweep_crossmae_depth
    fastmae sweep --values="mask_ratio=0.6,0.75" --data=/data/imagenet --pretrain_args="--preset=base --epochs=100"
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastmae import flags
from fastmae.eval.config import SECTIONS as EVAL_SECTIONS
from fastmae.eval.demo import DemoConfig, pretrain_on_digits
from fastmae.eval.protocol import EvalConfig
from fastmae.eval.protocols import get_protocol, list_protocols, protocol_for
from fastmae.flags import describe_keys, keys, parse_flags

BOTH = ("linprobe", "finetune")  # --protocol=both, and what a pretraining-key sweep scores each encoder with
# keys of the digits demo's pretraining that a sweep may vary
DIGITS_PRETRAIN_KEYS = ("method", "mask_ratio", "norm_pix_loss", "pretrain_epochs", "pretrain_blr", "decoder_dim",
                        "decoder_depth")


@dataclass
class SweepConfig:
    preset: str = flags.key("default", "named set of defaults; the values below are this preset's")
    protocol: str = field(default="finetune", metadata={
        "help": "a registered image protocol (linprobe, partial, finetune, knn), a comma list of them, or both "
                "(linprobe,finetune; pretraining keys always run at least those)"})
    values: str = field(default="", metadata={"help": "the swept key and its values, 'KEY=v1,v2,...'"})
    output_dir: str = flags.key("runs/sweep", "run folder (config, metrics, checkpoints, summary, pictures)")
    pretrain_epochs: int = flags.key(100, "digits demo pretraining epochs (pretraining-key sweeps)")
    method: str = field(default="mae", metadata={
        "help": "digits demo pretraining method (mae | crossmae); on real data put --method in --pretrain_args"})
    pretrain_args: str = field(default="", metadata={
        "help": "fastmae pretrain arguments for pretraining-key sweeps on real data"})
    threads: int = flags.key(1, "torch intra-op threads; 0 = torch's default")

    def protocols(self) -> list[str]:
        """The registered image protocols ``--protocol`` names, in order."""
        names = list(BOTH) if self.protocol == "both" else [p.strip() for p in self.protocol.split(",") if p.strip()]
        images = [p for p in list_protocols() if get_protocol(p).images]
        bad = [p for p in names if p not in images]
        if bad or not names:
            raise ValueError(f"protocol must be one of {', '.join(images)} (or a comma list, or both), "
                             f"got {self.protocol!r}")
        return list(dict.fromkeys(names))

    def validate(self) -> None:
        self.protocols()
        key, vals = parse_values(self.values)
        if len(set(vals)) != len(vals):
            raise ValueError(f"--values repeats a value: {vals}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be positive, got {self.pretrain_epochs}")
        from fastmae.methods.registry import get_method

        get_method(self.method)


class SweepPreempted(Exception):
    """A run of the sweep saved on SIGTERM: the sweep stops there and exits 0 (a rerun continues it)."""


def parse_values(spec: str) -> tuple[str, list[str]]:
    """``"tune_blocks=0,1,2"`` -> ("tune_blocks", ["0", "1", "2"])."""
    key, eq, rest = spec.partition("=")
    vals = [v.strip() for v in rest.split(",") if v.strip()]
    if not eq or not key.strip() or not vals:
        raise ValueError(f'--values needs KEY=v1,v2,... (e.g. --values="tune_blocks=0,1,2,4"), got {spec!r}')
    return key.strip(), vals


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """-> (the sweep's own --key=value, {protocol: its --key=value}); ``--linprobe.k=v`` goes to one protocol
    and wins over a shared ``--k=v``; a section's dotted key (``--optim.blr``) is shared like its flat one."""
    own_keys = {f.name for f in fields(SweepConfig)}
    own, shared, scoped = [], [], {p: [] for p in list_protocols()}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"expected --key=value, got {arg!r}")
        key = arg[2:].partition("=")[0].replace("-", "_")
        scope, dot, sub = key.partition(".")
        if dot and scope not in EVAL_SECTIONS:
            if scope not in scoped:
                raise ValueError(f"--{key}: the prefix must be a protocol name ({', '.join(scoped)}) or a section "
                                 f"({', '.join(EVAL_SECTIONS)})")
            scoped[scope].append(f"--{sub}={arg.partition('=')[2]}")
        elif key in own_keys:
            own.append(arg)
        else:
            shared.append(arg)
    return own, {p: shared + lst for p, lst in scoped.items()}


def key_kind(key: str, demo: bool) -> str:
    """'protocol', 'digits_pretrain' or 'pretrain'; raises for a key nobody knows."""
    if key in {k for p in list_protocols() for k in keys(get_protocol(p).config)} | set(keys(EvalConfig)):
        return "protocol"
    if demo and (key in DIGITS_PRETRAIN_KEYS):
        return "digits_pretrain"
    if not demo:
        return "pretrain"  # `fastmae pretrain` itself judges the key (check_pretrain_args)
    raise ValueError(f"cannot sweep --{key}: not a protocol key, nor a pretraining key ({DIGITS_PRETRAIN_KEYS})")


def check_pretrain_args(args: list[str], key: str) -> None:
    """Ask `fastmae pretrain --dry_run` (its own process: evaluation imports no program) whether the pretraining
    command line is valid before the first run, so a typo costs seconds, not a sweep's first evaluations."""
    cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", *args, "--dry_run"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or [f"exit code {done.returncode}"]
        raise ValueError(f"cannot sweep --{key}: fastmae pretrain refuses {shlex.join(args)}: "
                         f"{lines[-1].removeprefix('fastmae: error: ')}")


def _protocol_config(name: str, per_protocol: dict[str, list[str]], overrides: dict) -> EvalConfig:
    spec = get_protocol(name)
    if "tune_blocks" in overrides:
        try:
            target = protocol_for(int(overrides["tune_blocks"]))
        except ValueError:
            target = spec  # the protocol's own parser names the bad value
        if target.config is not spec.config:  # e.g. k = 0 is the linear probe, with its own recipe and keys
            name, spec = target.name, target
            overrides = {k: v for k, v in overrides.items() if k != "tune_blocks"}
    return parse_flags([*per_protocol[name], *(f"--{k}={v}" for k, v in overrides.items())], spec.config, spec.presets)


def run_protocol(name: str, cfg: EvalConfig, **sources) -> dict:
    """Run protocol ``name`` (the registry's) on ``cfg``; ``sources``: in-memory split and weights."""
    return get_protocol(name).run(cfg, **sources)


def run_sweep(cfg: SweepConfig, per_protocol: dict[str, list[str]]) -> list[dict]:
    cfg.validate()
    key, vals = parse_values(cfg.values)
    protocols = cfg.protocols()
    # every protocol configuration is checked before the first run
    probes = {p: _protocol_config(p, per_protocol, {}) for p in protocols}
    demo = all(c.data.is_demo for c in probes.values())
    kind = key_kind(key, demo)
    if kind != "protocol":
        protocols = list(dict.fromkeys([*BOTH, *protocols]))  # a pretraining sweep scores each encoder both ways
    for v in vals:
        for p in protocols:
            if kind == "protocol":
                _protocol_config(p, per_protocol, {key: v})
    if kind == "pretrain":
        check_pretrain_args([*shlex.split(cfg.pretrain_args), f"--{key}={vals[0]}"], key)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"config": asdict(cfg), "protocol_args": per_protocol}, indent=2) + "\n")

    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = None
    rows = []
    try:
        for v in vals:
            vdir = out / f"{key}={v}"
            source = {}
            for p in protocols:
                run_dir = vdir / p
                done = run_dir / "results.json"
                if not done.is_file():
                    if kind != "protocol" and not source:
                        source, split = _pretrain(cfg, key, v, vdir, kind, split)
                    ecfg = dataclasses.replace(_protocol_config(p, per_protocol, {key: v} if kind == "protocol" else {}),
                                               output_dir=str(run_dir), resume="auto")
                    if kind == "pretrain":
                        ecfg = dataclasses.replace(ecfg, model=dataclasses.replace(ecfg.model, ckpt=source["ckpt"]))
                    if ecfg.data.features == "auto" and not ecfg.data.is_demo:
                        # One store for the sweep: runs on the same encoder and data reuse its frozen features.
                        ecfg = dataclasses.replace(ecfg, data=dataclasses.replace(ecfg.data, features=str(out / "features")))
                    t0 = time.perf_counter()
                    r = run_protocol(p, ecfg, split=split if ecfg.data.is_demo else None, source_sd=source.get("sd"),
                                     source_meta=source.get("meta"))
                    if r.get("status") == "preempted":
                        raise SweepPreempted(f"SIGTERM: {key}={v} {p} saved at step {r['step']}; rerun the same "
                                             f"command to continue")
                    print(f"{key}={v} {p}: top-1 {r['top1']:.4f} ({r['reported']}) in {time.perf_counter() - t0:.0f}s",
                          flush=True)
                rows.append({key: v, "protocol": p, **read_result(done)})
    finally:
        torch.set_num_threads(threads)
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, key, out / "sweep.png", f"{cfg.method} on digits" if kind == "digits_pretrain" and key != "method" else "")
    return rows


def read_result(path: Path) -> dict:
    """The row of a finished run from its ``results.json``; ValueError (one line) for a damaged or foreign file."""
    try:
        res = json.loads(path.read_text())
        row = {k: float(res[k]) for k in ("top1", "top5", "top1_last")}
        row.update(epoch=int(res["epoch"]), reported=str(res["reported"]), wall_s=round(float(res["wall_s"]), 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not the results file of a finished run ({reason}); delete it to rerun that "
                         f"value") from None
    if not all(math.isfinite(row[k]) and 0.0 <= row[k] <= 1.0 for k in ("top1", "top5", "top1_last")):
        raise ValueError(f"{path} is not the results file of a finished run (accuracies outside [0, 1]); delete it "
                         f"to rerun that value")
    return row


def _pretrain(cfg: SweepConfig, key: str, value: str, vdir: Path, kind: str, split):
    """One pretraining for ``key=value`` (skipped when its checkpoint exists) -> (source, digits split)."""
    vdir.mkdir(parents=True, exist_ok=True)
    if kind == "digits_pretrain":
        from fastmae.eval.data import load_digits_split
        from fastmae.eval.models import read_source

        base = {"pretrain_epochs": cfg.pretrain_epochs, "method": cfg.method, key: value}
        dcfg = parse_flags([f"--{k}={v}" for k, v in base.items()], DemoConfig, {"default": {}})
        if split is None:
            split = load_digits_split(16, 1, seed=dcfg.seed)
        path = vdir / "mae_pretrained.pt"
        if path.is_file():
            sd, meta = read_source(str(path))
        else:
            sd, meta, pre = pretrain_on_digits(dcfg, split, path)
            print(f"{key}={value}: pretrained {pre['steps']} steps in {pre['wall_s']:.0f}s, "
                  f"final loss {pre['losses'][-1]:.4f}", flush=True)
        return {"sd": sd, "meta": meta}, split
    from fastmae.engine.checkpoint import latest_checkpoint

    pdir = vdir / "pretrain"
    if not (pdir / "summary.json").is_file():
        # Its own process, as a user would run it (evaluation imports no program: DESIGN.md, layering).
        cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", *shlex.split(cfg.pretrain_args), f"--{key}={value}",
               f"--output_dir={pdir}", "--resume=auto"]
        if subprocess.run(cmd).returncode != 0:
            raise ValueError(f"pretraining {key}={value} failed (see above): {shlex.join(cmd)}")
    return {"ckpt": str(latest_checkpoint(pdir))}, split


def plot(rows: list[dict], key: str, path: Path, what: str = "") -> Path:
    """top-1 vs ``key``, a line per protocol; ``what`` (e.g. "crossmae on digits") heads the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(_is_number(r[key]) for r in rows)
    labels = list(dict.fromkeys(r[key] for r in rows))
    for j, p in enumerate(dict.fromkeys(r["protocol"] for r in rows)):
        mine = [r for r in rows if r["protocol"] == p]
        xs = [float(r[key]) if numeric else labels.index(r[key]) for r in mine]
        ax.plot(xs, [100 * r["top1"] for r in mine], marker="o", color=f"C{j}", label=p)
        for x, r in zip(xs, mine, strict=True):
            ax.annotate(f"{100 * r['top1']:.1f}", (x, 100 * r["top1"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    if not numeric:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel("test top-1 (%)")
    when = "last epoch" if "last" in rows[0]["reported"] else "epoch chosen on train-carved val"
    ax.set_title(f"{what + ': ' if what else ''}top-1 vs {key} ({when})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: fastmae sweep --values=KEY=v1,v2,... [--key=value ...]\n\n{__doc__.strip()}\n\nkeys:")
        print(describe_keys(SweepConfig))
        print("\nplus any key of `fastmae finetune --help` / `fastmae linprobe --help`")
        return 0
    try:
        own, per = split_argv(argv)
        cfg = parse_flags(own, SweepConfig, {"default": {}})
        rows = run_sweep(cfg, per)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2
    except SweepPreempted as e:
        print(e, flush=True)
        return 0
    print(f"wrote {cfg.output_dir}/sweep.csv and sweep.png ({len(rows)} runs)")
    return 0
