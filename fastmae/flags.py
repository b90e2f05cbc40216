"""``--key=value`` command lines for any dataclass config: spellings, aliases, booleans, ``--config``, presets, help.

Every fastmae command parses its flags here (``fastmae.config`` adds pretraining's presets), so the
spellings are the same everywhere, and enters through :func:`run_cli` (``--help``, parse, one-line error).
A key's description lives only in its field (:func:`key`); a command's defaults of shared sections come from
:func:`section` / :func:`default`. Imports nothing of fastmae: any layer may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Flag names of the official MAE scripts (main_pretrain.py and friends) that differ from ours; every other
# official name (--blr, --batch_size, --accum_iter, --output_dir, --resume, --model, --mask_ratio, --epochs,
# --warmup_epochs, --weight_decay, --lr, --min_lr, --num_workers, --seed, --device) is already ours.
ALIASES = {"data_path": "data", "input_size": "img_size", "out": "output_dir"}

def key(default, help: str, **meta):
    """A config field with its one-line help (the only home of a key's description; every key of every command
    has one, tests/test_cli.py). ``meta``: e.g. ``flat="data"`` for a section field's ``--flag`` name."""
    return field(default=default, metadata={"help": help, **meta})


def raise_first(checks: list[tuple[bool, str]]) -> None:
    """A section's ``validate``: ValueError with the reason of the first failed (ok, reason) check."""
    for ok, reason in checks:
        if not ok:
            raise ValueError(reason)


def default(cls, name: str, value):
    """Field ``name`` of the config class ``cls`` with another default, its help and flat name kept: a command's
    own default of a shared run-level key (``output_dir: str = default(EvalConfig, "output_dir", "runs/knn")``)."""
    return field(default=value, metadata={f.name: f for f in fields(cls)}[name].metadata)


def section(cls, **defaults):
    """A section field whose keys take ``defaults`` instead of ``cls``'s (a command's recipe: the linear probe's
    ``blr=10.0``); every key keeps its help. :func:`build_config` starts from these values too."""
    return field(default_factory=functools.partial(cls, **defaults) if defaults else cls)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_NONE = ("", "none", "auto", "default")  # what an optional key (``bool | None``) takes for None: the model's default


@dataclass(frozen=True)
class Key:
    """One settable key of a config class.

    flat: its ``--flag`` name, unique across sections (``blr``; ``data`` for ``data.path``);
    path: where the value lives (``optim.blr``, ``seed``); also accepted as a flag (``--optim.blr``);
    owners: for a key of a variant section (the method's keys), the variants that take it.
    """

    flat: str
    path: str
    typ: Any
    help: str = ""
    owners: tuple[str, ...] = ()


def _optional(typ) -> tuple[Any, bool]:
    """(inner type, True) for ``X | None``; (typ, False) otherwise."""
    args = typing.get_args(typ)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typ, False


def _is_bool(typ) -> bool:
    return _optional(typ)[0] is bool


def _parse_value(name: str, text: str, typ):
    inner, optional = _optional(typ)
    if optional and text.lower() in _NONE:
        return None
    if inner is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"--{name} expects true/false{' (or none)' if optional else ''}, got {text!r}")
    try:
        return inner(text)
    except ValueError:
        raise ValueError(f"--{name} expects {inner.__name__}, got {text!r}") from None


def _section_types(cls) -> dict[str, type]:
    """{field name: section dataclass} of a config class made of sections (empty for a flat one)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _variants(cls, section: str) -> dict[str, type] | None:
    """The classes a variant section can take ({method name: its keys' dataclass}), or None for a plain section."""
    pick = {f.name: f for f in fields(cls)}[section].metadata.get("variants")
    return pick() if pick else None


def keys(cls) -> dict[str, Key]:
    """Every key of ``cls`` under its flat name and under its dotted path (a section's keys are the section's
    fields; a variant section's are the union over its variants, each key knowing its owners)."""
    hints, sections, out = typing.get_type_hints(cls), _section_types(cls), {}
    for f in fields(cls):
        if f.name not in sections:
            out[f.name] = Key(f.name, f.name, hints[f.name], f.metadata.get("help", ""))
            continue
        base = {g.name for g in fields(sections[f.name])}
        variants = _variants(cls, f.name) or {"": sections[f.name]}
        for owner, sec in variants.items():
            sec_hints = typing.get_type_hints(sec)
            for g in fields(sec):
                flat, path = g.metadata.get("flat", g.name), f"{f.name}.{g.name}"
                prev = out.get(flat)
                if prev is not None and prev.path != path:
                    raise TypeError(f"{cls.__name__}: flat key {flat!r} is both {prev.path} and {path}")
                mine = (owner,) if owner and g.name not in base else ()
                out[flat] = Key(flat, path, sec_hints[g.name], g.metadata.get("help", ""),
                                (prev.owners if prev else ()) + mine)
    out.update({k.path: k for k in list(out.values()) if k.path not in out})
    return out


def unique_keys(cls) -> list[Key]:
    """Each key of ``cls`` once, in declaration order."""
    return list({k.path: k for k in keys(cls).values()}.values())


def _canonical(raw: str, table: dict[str, Key]) -> tuple[Key | None, bool]:
    """(key, negated) for a flag name: dashes as underscores, official aliases, ``no_<bool key>``, dotted paths."""
    name = raw.replace("-", "_")
    if name not in table and ALIASES.get(name) in table:
        name = ALIASES[name]
    if name not in table and name.startswith("no_") and name[3:] in table and _is_bool(table[name[3:]].typ):
        return table[name[3:]], True
    return table.get(name), False


def parse_flags(argv: list[str], cls, presets: dict[str, dict] | None = None, default_preset: str | None = None):
    """``['--preset=x', '--epochs=1', ...]`` -> a validated ``cls``.

    Precedence: the class defaults < the preset (``--preset``, else ``default_preset``, else the class's
    ``preset`` default) < ``--config=FILE`` < later flags (a flag after another flag of the same key wins).
    Unknown keys and unparsable values raise ValueError naming them (the CLI turns that into a one-line
    message). Spellings: :func:`split_args`.
    """
    table = keys(cls)
    given = _split(argv, cls)
    texts = {path: text for path, text, _ in given}
    explicit = {path for path, _, from_file in given if not from_file}
    presets = presets or {}
    preset = texts.get("preset", default_preset or getattr(cls(), "preset", None))
    base = {}
    if preset is not None and (presets or "preset" in texts):
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
        # The config records the preset it was built from, also when a default chose it.
        unknown = sorted(set(presets[preset]) - set(table))
        if unknown:
            raise ValueError(f"preset {preset!r} sets keys this command does not take: {', '.join(unknown)}")
        base = {**{table[k].path: v for k, v in presets[preset].items()}, **({"preset": preset} if "preset" in table else {})}
    values = {**base, **{p: _parse_value(table[p].flat, t, table[p].typ) for p, t in texts.items()}}
    cfg = build_config(cls, values, explicit)  # not replace(cls(), ...): defaults that depend on other keys are derived anew
    top = {f.name for f in fields(cls)}
    check_common_keys(cfg, top)
    for key, is_dir in (("output_dir", True), ("output", False)):  # every command's place to write
        if key in top and getattr(cfg, key):
            check_output_path(key, getattr(cfg, key), is_dir)
    cfg.validate()
    return cfg


def build_config(cls, values: dict, explicit: set[str] = frozenset()):
    """``cls`` from {dotted path: value}. A variant section takes the class its ``name`` picks; a key of another
    variant is dropped when it came from a file or preset (older flat configs hold every method's keys) and
    refused in one line when it was given as a flag (a path in ``explicit``)."""
    top: dict[str, Any] = {}
    by_section: dict[str, dict] = {}
    for path, v in values.items():
        sec, _, name = path.rpartition(".")
        (by_section.setdefault(sec, {}) if sec else top)[name] = v
    for name, typ in _section_types(cls).items():
        kw = by_section.get(name, {})
        variants = _variants(cls, name)
        base = {f.name: f for f in fields(cls)}[name].default_factory()
        if variants is None:
            top[name] = dataclasses.replace(base, **kw)  # from the command's section defaults (:func:`section`)
            continue
        typ = _pick_variant(name, kw.get("name", base.name), variants, kw, explicit, keys(cls))
        top[name] = typ(**{k: v for k, v in kw.items() if k in {g.name for g in fields(typ)}})
    return cls(**top)


def from_flat(cls, values: dict):
    """``cls`` from {flat key or dotted path: value} (``{"blr": 1e-3, "data": "demo"}``, a preset), unvalidated;
    an unknown key raises ValueError naming it."""
    table = keys(cls)
    unknown = sorted(k for k in values if k not in table)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return build_config(cls, {table[k].path: v for k, v in values.items()})


def _pick_variant(section: str, choice: str, variants: dict[str, type], kw: dict, explicit, table) -> type:
    if choice not in variants:
        raise ValueError(f"{section} must be one of {', '.join(sorted(variants))}, got {choice!r}")
    own = {g.name for g in fields(variants[choice])}
    for k in sorted(set(kw) - own):
        if f"{section}.{k}" in explicit:
            key = table[f"{section}.{k}"]
            raise ValueError(f"--{key.flat} is a key of --{section}={' / '.join(key.owners)}; "
                             f"--{section}={choice} does not take it")
    return variants[choice]


def flat_values(cfg) -> dict[str, Any]:
    """{flat key: value} of a config (a sectioned one flattened; a variant section gives only its own keys)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update({g.metadata.get("flat", g.name): getattr(v, g.name) for g in fields(v)})
        else:
            out[f.name] = v
    return out


def flat_dict(data: dict, cls) -> dict[str, Any]:
    """A stored config (nested ``{"optim": {"blr": ...}}`` as written now, or flat as older runs and checkpoints
    wrote it) as {flat key: value}, text values of typed keys parsed (older tri-state ``"true"`` / ``""`` become
    True / None); entries this class does not know are kept as they are."""
    table, out = keys(cls), {}
    for k, v in data.items():
        if isinstance(v, dict) and k in _section_types(cls):
            out.update({f"{k}.{n}": x for n, x in v.items()})
        else:
            out[k] = v
    return {(table[k].flat if k in table else k): _coerce(table.get(k), v) for k, v in out.items()}


def _coerce(key: Key | None, v):
    if key is None or not isinstance(v, str) or _optional(key.typ)[0] is str:
        return v
    try:
        return _parse_value(key.flat, v, key.typ)
    except ValueError:
        return v


MAX_THREADS = 1024
# Per-rank seeds are derived as seed * 1000 + rank + 1, and torch and numpy take seeds below 2**64 / 2**32.
MAX_SEED = 2**32


def check_common_keys(cfg, top: set[str]) -> None:
    """Keys many commands share (run-level fields, ``top``), checked the same way for all of them (a huge count
    must never reach torch)."""
    threads, seed, device = (getattr(cfg, k, None) if k in top else None for k in ("threads", "seed", "device"))
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [0, {MAX_THREADS}], got {threads}")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise ValueError(f"--seed: seed must be >= 0 and < 2**32, got {seed}")
    if isinstance(device, str) and not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", device)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def check_output_path(key: str, path: str, is_dir: bool = True) -> None:
    """A folder (``is_dir``) or file to be written must be creatable: under folders only, the nearest existing
    one writable, and not the other kind of thing already. ValueError with one line naming ``key``."""
    import os

    if not path:
        raise ValueError(f"{key} must not be empty")
    p = Path(path)
    if p.exists() and p.is_dir() != is_dir:
        raise ValueError(f"{key} {path!r} is a {'file' if is_dir else 'folder'}, not a {'folder' if is_dir else 'file'}")
    for q in (p if is_dir else p.parent, *(p if is_dir else p.parent).parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"{key} {path!r} lies under {str(q)!r}, which is a file, not a folder")
            if not os.access(q, os.W_OK | os.X_OK):
                raise ValueError(f"{key} {path!r}: {str(q)!r} is not writable")
            return


def split_args(argv: list[str], cls) -> list[tuple[str, str]]:
    """``argv`` -> [(flat key, text value)] in order; ``--config=FILE`` expands in place to the file's values.

    Accepted: ``--key=value``, ``--key value``, ``--img-size`` for ``--img_size``, dotted paths
    (``--optim.blr`` = ``--blr``), the official MAE names (:data:`ALIASES`), bare booleans (``--norm_pix_loss``,
    ``--no_norm_pix_loss``), and leading positional values for the fields a class lists in ``positional``
    (e.g. ``fastmae data check DIR``).
    """
    table = keys(cls)
    return [(table[path].flat, text) for path, text, _ in _split(argv, cls)]


def _split(argv: list[str], cls) -> list[tuple[str, str, bool]]:
    """:func:`split_args` with a third item: True where the value came from a ``--config`` file."""
    table = keys(cls)
    positional = list(getattr(cls, "positional", ()))
    out: list[tuple[str, str, bool]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not positional:
                raise ValueError(f"expected --key=value, got {arg!r}")
            out.append((table[positional.pop(0)].path, arg, False))
            continue
        raw, eq, val = arg[2:].partition("=")
        key, negated = _canonical(raw, table)
        if key is None and raw.replace("-", "_") == "config":
            out += [(p, t, True) for p, t in _config_file_pairs(val if eq else (argv[i] if i < len(argv) else ""), table)]
            i += 0 if eq else 1
            continue
        if key is None:
            close = [k for k in table if "." not in k and k.startswith(raw.replace("-", "_")[:3])]
            hint = f"; did you mean {', '.join('--' + k for k in close[:3])}?" if close else ""
            raise ValueError(f"unknown config key --{raw}{hint}")
        if _is_bool(key.typ):
            if negated:
                if eq:
                    raise ValueError(f"--{raw} takes no value (it sets {key.flat}=false)")
                val = "false"
            elif not eq:
                # A bare boolean flag; `--compile false` (a literal after it) still works.
                nxt = argv[i].lower() if i < len(argv) else ""
                val, i = (nxt, i + 1) if nxt in _TRUE + _FALSE else ("true", i)
        elif not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise ValueError(f"--{raw} needs a value (--{raw}=VALUE)")
            val = argv[i]
            i += 1
        out.append((key.path, val, False))
    return out


def _config_file_pairs(path: str, table: dict[str, Key]) -> list[tuple[str, str]]:
    """The values of a run's ``config.json`` (nested by section, or flat as older runs wrote it) as (path, text)
    pairs; keys this command lacks are an error."""
    p = Path(path)
    if not path or not p.is_file():
        raise ValueError(f"--config: no such file {path!r} (give a run's config.json)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {p} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"--config: {p} is nested too deeply to be a run's config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {p} must hold a JSON object")
    pairs, unknown = [], []
    for name, v in data.items():
        inner = v.items() if isinstance(v, dict) and any(k.path.startswith(name + ".") for k in table.values()) else None
        for path, x in ((f"{name}.{n}", y) for n, y in inner) if inner is not None else [(name, v)]:
            key = table.get(path)
            if key is None:
                unknown.append(path)
            else:
                pairs.append((key.path, _text(x)))
    if unknown:
        raise ValueError(f"--config: {p} has keys this command does not take: {', '.join(sorted(unknown))}")
    return pairs


def _text(v) -> str:
    """A JSON value as the text a flag would carry."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def key_help(cls, name: str) -> str:
    """The one-line description of a key: its field's ``help`` metadata."""
    return keys(cls)[name].help


def _value(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _cells(rows: list[tuple[str, str]]) -> str:
    width = min(max(len(c) for c, _ in rows), 44)
    return "\n".join(f"{c.ljust(width)}  {h}" if len(c) <= width else f"{c}\n{' ' * width}  {h}" for c, h in rows)


def describe_keys(cls, cfg=None) -> str:
    """One line per key: ``--key=value`` (``cfg``'s, e.g. preset-resolved; default: the class defaults) and its help;
    a config made of sections gets a heading per section (run-level keys first)."""
    cfg = cfg if cfg is not None else cls()
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in unique_keys(cls):
        sec = key.path.rpartition(".")[0]
        name = key.path.rpartition(".")[2]
        owned = sec and key.owners and not hasattr(getattr(cfg, sec), name)
        value = _value(cfg, key.path) if not owned else _variant_default(cls, sec, key.owners[0], name)
        cell = f"  --{key.flat}={_show(value)}"
        label = f"{sec}: keys of other {sec}s" if owned else sec
        groups.setdefault(label, []).append((cell, key.help + (f" [{sec} {', '.join(key.owners)}]" if owned else "")))
    if list(groups) == [""]:
        return _cells(groups[""])
    return "\n\n".join(f"{_title(cls, cfg, label)}:\n{_cells(rows)}" for label, rows in groups.items())


def _variant_default(cls, section: str, variant: str, name: str):
    return getattr(_variants(cls, section)[variant](), name)


def _title(cls, cfg, label: str) -> str:
    if not label:
        return "run"
    if label in _section_types(cls) and _variants(cls, label) is not None:
        return f"{label} (--{label}={_value(cfg, label).name})"
    return label


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v) if not isinstance(v, str) or v else "''"


def help_text(argv: list[str], cls, presets: dict[str, dict], usage: str, doc: str = "", parse=None) -> str:
    """``--help`` of a command: usage, the docstring, presets, then every key with the value it would take.

    The other flags on the line are applied, so ``--preset=base --help`` shows the base recipe's values.
    """
    rest = [a for a in argv if a not in ("-h", "--help")]
    note = "defaults"
    try:
        cfg = (parse or parse_flags)(rest, cls, presets)
        if rest:
            note = "values with " + " ".join(rest)
    except ValueError as e:
        cfg, note = cls(), f"defaults (the other flags do not parse: {e})"
    names = sorted(presets)
    parts = [usage]
    if doc.strip():
        parts.append(doc.strip())
    parts.append("flags: --key=value or --key value; --key-name = --key_name; bare --flag / --no_flag for booleans;"
                 " --config=RUN/config.json starts from a run's config (later flags override it)"
                 + ("; every key also as --section.key (--optim.blr = --blr)" if _section_types(cls) else ""))
    if ALIASES:
        parts.append("aliases (official MAE names): " + ", ".join(f"--{a} = --{t}" for a, t in ALIASES.items()))
    if names:
        parts.append(f"presets: {', '.join(names)}")
    parts.append(f"keys ({note}):\n" + describe_keys(cls, cfg))
    return "\n\n".join(parts)


def run_cli(argv: list[str], cls, presets: dict[str, dict] | None, body: Callable, prog: str, doc: str,
            usage: str = "") -> int:
    """A command's entry: ``--help`` prints :func:`help_text` and returns 0; otherwise ``argv`` is parsed into
    ``cls`` and ``body(cfg)`` runs. Bad configuration and bad input (ValueError, FileNotFoundError, from the
    parse or the body) print one ``fastmae: error:`` line and return 2."""
    presets = presets or {}
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(argv, cls, presets, usage or f"usage: fastmae {prog} [--key=value ...]", doc))
        return 0
    try:
        return int(body(parse_flags(argv, cls, presets)) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastmae: error: {e}", file=sys.stderr)
        return 2


def underscores(argv: list[str]) -> list[str]:
    """``--img-size=3`` -> ``--img_size=3``: the spelling of every fastmae command, for argparse-based scripts (bench/)."""
    out = []
    for a in argv:
        if a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            a = f"--{key.replace('-', '_')}{eq}{val}"
        out.append(a)
    return out
