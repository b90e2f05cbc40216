"""Compile every Triton kernel configuration of fastmae for sm_80 and sm_90 on a machine without a GPU.

For each kernel the launchers pick (BLOCK, num_warps) from the shape
(``block_config`` / ``bwd_config``), and the pointer dtypes
and compile-time flags from the inputs; this script enumerates those choices,
compiles each with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
and reads registers / stack / local (spill) memory from the cubin with
``cuobjdump --dump-resource-usage`` (Triton's own ``n_regs``/``n_spills`` are
only filled in when a binary is loaded on a device). Shared memory comes from
the compiled metadata.

    python tools/kernel_compile_report.py [--subset ci|full] [--arch 80 90] [--only gather_queries ...]
                                          [--json out.json] [--workers 2]

Exit status 1 if any configuration fails to compile or spills.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The report compiles real GPU code: the interpreter must be off before any kernel is defined.
os.environ.pop("TRITON_INTERPRET", None)

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "u8": "*u8"}
FLOATS = ("fp32", "bf16", "fp16")
# (C, patch) pairs whose P = p*p*C reaches every block size the launchers allow (16 ... 4096).
PATCHES = [(1, 4), (3, 3), (3, 4), (3, 6), (3, 8), (3, 12), (3, 14), (3, 16), (3, 24), (3, 32)]
WIDTHS = [16, 24, 48, 100, 192, 384, 512, 768, 1024, 1280, 2048, 4096]
TYPICAL_PATCH = (3, 16)  # ViT-B/L: P = 768
TYPICAL_WIDTH = 512  # MAE decoder


def _promote(a: str, b: str) -> str:
    return a if a == b else "fp32"


def k1_fwd_job(C: int, p: int, src: str, out: str, label: str = "") -> tuple:
    """(kernel, jit function name, signature, constexprs, num_warps, description) of K1's forward for one config."""
    from fastmae.kernels._common import block_config

    P = p * p * C
    block, warps = block_config(P)
    sig = {
        "img_ptr": DTYPES[src], "ids_ptr": "*i64", "shift_ptr": "*fp32", "scale_ptr": "*fp32",
        "out_ptr": DTYPES[out], **{k: "i32" for k in ("L_vis", "w", "s_n", "s_c", "s_h", "s_w", "s_idn", "s_idl")},
        "P": "constexpr", "C": "constexpr", "PATCH": "constexpr", "NORMALIZE": "constexpr", "BLOCK_P": "constexpr",
    }
    const = {"P": P, "C": C, "PATCH": p, "NORMALIZE": src == "u8", "BLOCK_P": block}
    return "K1 patchify_gather fwd", "_patchify_gather_fwd_kernel", sig, const, warps, f"{label}P={P} {src}->{out}"


def _k1_fwd_jobs(subset: str):
    dtype_pairs = [(i, o) for i in ("u8",) + FLOATS for o in FLOATS]
    for (C, p), (src, out) in itertools.product(PATCHES, dtype_pairs):
        if subset == "ci" and (C, p) != TYPICAL_PATCH and (src, out) != ("u8", "bf16"):
            continue
        yield k1_fwd_job(C, p, src, out)


def _k1_bwd_jobs(subset: str):
    from fastmae.kernels._common import block_config

    for (C, p), g, img in itertools.product(PATCHES, FLOATS, FLOATS):
        if subset == "ci" and (C, p) != TYPICAL_PATCH and (g, img) != ("bf16", "fp32"):
            continue
        P = p * p * C
        block, warps = block_config(P)
        sig = {
            "grad_out_ptr": DTYPES[g], "ids_ptr": "*i64", "grad_img_ptr": DTYPES[img],
            **{k: "i32" for k in ("L_vis", "w", "s_n", "s_c", "s_h", "s_w", "s_idn", "s_idl")},
            "P": "constexpr", "C": "constexpr", "PATCH": "constexpr", "BLOCK_P": "constexpr",
        }
        const = {"P": P, "C": C, "PATCH": p, "BLOCK_P": block}
        yield "K1 patchify_gather bwd", "_patchify_gather_bwd_kernel", sig, const, warps, f"P={P} grad {g}->{img}"


def _k2_fwd_jobs(subset: str):
    from fastmae.kernels._common import block_config

    for D, x, pos in itertools.product(WIDTHS, FLOATS, FLOATS):
        if subset == "ci" and D != TYPICAL_WIDTH and (x, pos) != ("bf16", "fp32"):
            continue
        block, warps = block_config(D, "embedding dim")
        out = _promote(x, pos)
        sig = {
            "x_ptr": DTYPES[x], "mask_token_ptr": DTYPES[x], "ids_restore_ptr": "*i64", "pos_ptr": DTYPES[pos],
            "out_ptr": DTYPES[out], **{k: "i32" for k in ("L", "L_vis", "D", "s_xn", "s_xt", "s_idn", "s_idl", "s_pt")},
            "BLOCK_D": "constexpr",
        }
        yield "K2 unshuffle_scatter fwd", "_unshuffle_scatter_fwd_kernel", sig, {"BLOCK_D": block}, warps, \
            f"D={D} x {x} + pos {pos} -> {out}"


def _k2_bwd_jobs(subset: str):
    from fastmae.kernels.unshuffle_scatter import bwd_config

    blocks = sorted({bwd_config(D) for D in WIDTHS})
    for (block_t, block_d, warps), g, x in itertools.product(blocks, FLOATS, FLOATS):
        if subset == "ci" and block_d != bwd_config(TYPICAL_WIDTH)[1] and (g, x) != ("fp32", "bf16"):
            continue
        sig = {
            "grad_out_ptr": DTYPES[g], "ids_restore_ptr": "*i64", "grad_x_ptr": DTYPES[x], "partial_ptr": "*fp32",
            **{k: "i32" for k in ("L", "L_vis", "D", "T_BLOCKS", "s_idn", "s_idl")},
            "BLOCK_T": "constexpr", "BLOCK_D": "constexpr",
        }
        yield "K2 unshuffle_scatter bwd", "_unshuffle_scatter_bwd_kernel", sig, \
            {"BLOCK_T": block_t, "BLOCK_D": block_d}, warps, f"tile {block_t}x{block_d} grad {g} -> x {x}"


_K3_INTS = ("w", "s_n", "s_c", "s_h", "s_w", "s_idn", "s_idl", "s_pn", "s_pl")
_K3_FLAGS = ("P", "C", "PATCH", "NORMALIZE", "NORM_PIX", "L1", "PRED_FULL", "BLOCK_P")


def k3_job(kind: str, C: int, p: int, img: str, pred: str, norm_pix: bool, l1: bool, full: bool, label: str = "") -> tuple:
    """(kernel, jit function name, signature, constexprs, num_warps, description) of K3's ``kind`` ('fwd' or 'bwd')."""
    from fastmae.kernels._common import block_config

    P = p * p * C
    block, warps = block_config(P)
    images = {"pred_ptr": DTYPES[pred], "img_ptr": DTYPES[img]}
    norm = {"shift_ptr": "*fp32", "scale_ptr": "*fp32"}
    if kind == "fwd":
        sig = {**images, "ids_ptr": "*i64", **norm, "loss_ptr": "*fp32", "L_mask": "i32",
               **{k: "i32" for k in _K3_INTS}, "eps": "fp32"}
    else:
        # Without full predictions the launcher passes a placeholder (the fp32 upstream gradient) as the mask.
        sig = {"grad_loss_ptr": "*fp32", **images, "ids_ptr": "*i64", "is_masked_ptr": "*u8" if full else "*fp32", **norm,
               "grad_ptr": DTYPES[pred], "L_pred": "i32", **{k: "i32" for k in _K3_INTS}, "count": "fp32", "eps": "fp32"}
    sig.update({k: "constexpr" for k in _K3_FLAGS})
    const = {"P": P, "C": C, "PATCH": p, "NORMALIZE": img == "u8", "NORM_PIX": norm_pix, "L1": l1, "PRED_FULL": full,
             "BLOCK_P": block}
    desc = (f"{label}P={P} img {img} pred {pred} {'normpix' if norm_pix else 'raw'} {'l1' if l1 else 'mse'} "
            f"{'full' if full else 'masked-only'}")
    return f"K3 masked_recon_loss {kind}", f"_masked_recon_loss_{kind}_kernel", sig, const, warps, desc


def _k3_jobs(subset: str):
    flag_sets = list(itertools.product((False, True), repeat=3))  # NORM_PIX, L1, PRED_FULL
    default_flags = (True, False, True)
    jobs = []
    for (C, p), flags in itertools.product(PATCHES, flag_sets):
        for img in ("u8", "fp32"):
            jobs.append(((C, p), flags, img, "fp32"))
    for (C, p), img, pred in itertools.product(PATCHES, ("u8",) + FLOATS, FLOATS):
        jobs.append(((C, p), default_flags, img, pred))
    seen = set()
    for (C, p), flags, img, pred in jobs:
        if (C, p, flags, img, pred) in seen:
            continue
        seen.add((C, p, flags, img, pred))
        if subset == "ci" and (C, p) != TYPICAL_PATCH and not (flags == default_flags and (img, pred) == ("u8", "bf16")):
            continue
        if subset == "ci" and (C, p) == TYPICAL_PATCH and pred != "fp32" and flags != default_flags:
            continue
        for kind in ("fwd", "bwd"):
            yield k3_job(kind, C, p, img, pred, *flags)


def _gq_fwd_jobs(subset: str):
    from fastmae.kernels._common import block_config

    for D, mt, pos in itertools.product(WIDTHS, FLOATS, FLOATS):
        if subset == "ci" and D != TYPICAL_WIDTH and (mt, pos) != ("fp32", "fp32"):
            continue
        block, warps = block_config(D, "embedding dim")
        out = _promote(mt, pos)
        sig = {"mask_token_ptr": DTYPES[mt], "pos_ptr": DTYPES[pos], "ids_ptr": "*i64", "out_ptr": DTYPES[out],
               **{k: "i32" for k in ("L_t", "D", "s_idn", "s_idl", "s_pt")}, "BLOCK_D": "constexpr"}
        yield "gather_queries fwd", "_gather_queries_fwd_kernel", sig, {"BLOCK_D": block}, warps, \
            f"D={D} mask token {mt} + pos {pos} -> {out}"


def _gq_bwd_jobs(subset: str):
    from fastmae.kernels.gather_queries import bwd_config

    blocks = sorted({bwd_config(D) for D in WIDTHS})
    for (block_n, block_d, warps), g, pos, write_pos in itertools.product(blocks, FLOATS, FLOATS, (False, True)):
        if not write_pos and pos != "fp32":
            continue  # the position table's dtype only matters when its gradient is written
        if subset == "ci" and block_d != bwd_config(TYPICAL_WIDTH)[1] and (g, pos, write_pos) != ("fp32", "fp32", True):
            continue
        sig = {"grad_out_ptr": DTYPES[g], "slot_ptr": "*i32", "partial_ptr": "*fp32",
               "grad_pos_ptr": DTYPES[pos] if write_pos else "*fp32", **{k: "i32" for k in ("N", "L", "L_t", "D")},
               **{k: "constexpr" for k in ("BLOCK_N", "BLOCK_D", "WRITE_POS", "CAST_POS")}}
        const = {"BLOCK_N": block_n, "BLOCK_D": block_d, "WRITE_POS": write_pos, "CAST_POS": write_pos and g != pos}
        yield "gather_queries bwd", "_gather_queries_bwd_kernel", sig, const, warps, \
            f"tile {block_n}x{block_d} grad {g}" + (f" -> pos {pos}" if write_pos else " (mask token only)")


_GENERATORS = {
    "patchify_gather": (_k1_fwd_jobs, _k1_bwd_jobs),
    "unshuffle_scatter": (_k2_fwd_jobs, _k2_bwd_jobs),
    "masked_recon_loss": (_k3_jobs,),
    "gather_queries": (_gq_fwd_jobs, _gq_bwd_jobs),
}



def kernel_op(fn_name: str) -> str:
    """The op a jit kernel belongs to, by the naming convention of kernels/<op>.py: ``_<op>_{fwd,bwd}_kernel``."""
    return fn_name.removeprefix("_").removesuffix("_kernel").rsplit("_", 1)[0]


def as_jobs(specs, archs: list[int]) -> list[dict]:
    """Compile jobs (dicts for ``compile_one``) of each (kernel, fn, signature, constexprs, warps, config) spec, per arch."""
    return [dict(kernel=kernel, op=kernel_op(fn_name), fn=fn_name, signature=sig, constexprs=const, num_warps=warps,
                 config=desc, arch=arch) for kernel, fn_name, sig, const, warps, desc in specs for arch in archs]


def all_jobs(subset: str, archs: list[int], only: list[str] | None = None) -> list[dict]:
    from fastmae.ops import OPS

    unknown = sorted(set(OPS) - set(_GENERATORS))
    if unknown:  # a new op must bring its compile jobs: the report covers every registered op
        raise SystemExit(f"fastmae: error: no compile jobs for the op(s) {unknown}: add their generators to _GENERATORS "
                         f"in {Path(__file__).name}")
    gens = [gen for name, pair in _GENERATORS.items() if not only or name in only for gen in pair]
    return as_jobs([spec for gen in gens for spec in gen(subset)], archs)


def _cuobjdump() -> str | None:
    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cand.exists():
        return str(cand)
    return shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict[str, int]:
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (triton's bundled one or on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return {k: int(fields[k.upper()]) for k in ("reg", "stack", "local", "shared")}
    raise RuntimeError(f"no resource line in cuobjdump output:\n{text}")


def compile_one(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(f"fastmae.kernels.{job['op']}"), job["fn"])
    row = {k: job[k] for k in ("kernel", "op", "config", "arch", "num_warps")}
    c = job["constexprs"]
    rows_block = c.get("BLOCK_T", c.get("BLOCK_N"))
    row["block"] = f"{rows_block}x{c['BLOCK_D']}" if rows_block else c.get("BLOCK_P", c.get("BLOCK_D"))
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options={"num_warps": job["num_warps"]})
        res = _resources(compiled.asm["cubin"])
        row.update(regs=res["reg"], stack=res["stack"], local=res["local"],
                   shared=int(compiled.metadata.shared), error=None)
        row["spills"] = res["local"] > 0 or res["stack"] > 0
    except Exception as exc:  # noqa: BLE001 - every failure is reported, and fails the run
        row.update(regs=None, stack=None, local=None, shared=None, spills=None, error=f"{type(exc).__name__}: {exc}")
    return row


def run(subset: str, archs: list[int], workers: int, only: list[str] | None = None) -> list[dict]:
    jobs = all_jobs(subset, archs, only)
    if workers <= 1:
        return [compile_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, jobs, chunksize=4))


def summarize(rows: list[dict]) -> str:
    """One markdown line per (kernel, arch, block, num_warps): config count and the worst registers/stack/shared."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["block"], r["num_warps"]), []).append(r)
    lines = ["| kernel | sm | BLOCK | warps | configs | regs (min-max) | spill/stack bytes (max) | shared B (max) | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]).rjust(9))  # noqa: E731 - numeric blocks sort by size
    for (kernel, arch, block, warps), rs in sorted(groups.items(), key=order):
        ok = [r for r in rs if r["error"] is None]
        fails = len(rs) - len(ok)
        regs = f"{min(r['regs'] for r in ok)}-{max(r['regs'] for r in ok)}" if ok else "-"
        spill = max((r["local"] + r["stack"] for r in ok), default=0)
        shared = max((r["shared"] for r in ok), default=0)
        lines.append(f"| {kernel} | {arch} | {block} | {warps} | {len(rs)} | {regs} | {spill} | {shared} | {fails} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", choices=("ci", "full"), default="full")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=sorted(_GENERATORS), default=None, help="compile these kernel modules only")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.subset, args.arch, args.workers, args.only)
    elapsed = time.perf_counter() - t0
    print(summarize(rows))
    bad = [r for r in rows if r["error"] is not None or r["spills"]]
    for r in bad:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['config']}: {r['error'] or 'spills'}", file=sys.stderr)
    print(f"\n{len(rows)} compilations ({args.subset}, sm {args.arch}) in {elapsed:.0f} s; {len(bad)} failing")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
