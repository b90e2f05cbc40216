"""Kernels and bytes of one compiled transformer block, forward + backward, under bf16 autocast (CPU Inductor).

    python bench/profile_block.py                       # ViT-B encoder (768, 50 tokens) and decoder (512, 197) blocks
    python bench/profile_block.py --batch 4 --residual bf16
    TORCH_LOGS=output_code python bench/profile_block.py --parts decoder   # + Inductor's generated code

Counts per block (issue 22, lever 6): Inductor's generated kernels (fused elementwise/reduction loops) and the
bytes Inductor counts for its graphs (``graph.count_bytes``: every buffer a fused kernel reads or writes), the
extern calls the profiler sees in one training call (GEMMs, attention), and the dtype conversions Inductor emitted.
The bytes are Inductor's own estimate of the fused graph at this batch, the same count its GPU backend makes.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter

import torch
from torch._inductor import metrics

from fastmae.layers.block import Block

PARTS = {"encoder": (768, 12, 50), "decoder": (512, 16, 197)}


def profile_block(dim: int, heads: int, tokens: int, batch: int, residual: str) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    metrics.reset()
    block = Block(dim, heads, residual_dtype=residual)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    step = torch.compile(block, fullgraph=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = step(x)
        y.float().sum().backward()

    run()  # compiles forward and backward: the metrics below are of these two graphs
    out = {"inductor_kernels": metrics.generated_kernel_count, "bytes": metrics.num_bytes_accessed,
           "to_dtype_ops": metrics.cpp_to_dtype_count}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    events = [e.name for e in prof.events()]
    out["fused_kernel_calls"] = sum("cpp_fused" in n for n in events)
    out["fused_kernels"] = sorted({n.split("cpp_fused_")[-1] for n in events if "cpp_fused" in n})
    names = Counter(n for n in events if n.startswith(("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot",
                                                         "aten::bernoulli", "aten::native_dropout")))
    out["extern_calls"] = dict(sorted(names.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--residual", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()
    # Inductor computes graph.count_bytes only with its metrics log on; kernel profiling names each fused kernel.
    torch._inductor.config.cpp.enable_kernel_profile = True
    # A cached graph skips code generation, and with it the byte count.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._logging.set_logs(inductor_metrics=True)
    logging.getLogger("torch._inductor.compile_fx").setLevel(logging.WARNING)
    print("| part | residual | batch | fused kernels run | bytes (fwd+bwd) | bytes per token-channel | dtype conversions | "
          "extern calls |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for part in args.parts:
        dim, heads, tokens = PARTS[part]
        r = profile_block(dim, heads, tokens, args.batch, args.residual)
        per_tc = r["bytes"] / (args.batch * tokens * dim)
        ext = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in r["extern_calls"].items())
        print(f"| {part} | {args.residual} | {args.batch} | {r['fused_kernel_calls']} | {r['bytes'] / 1e6:.2f} MB | "
              f"{per_tc:.0f} B | {r['to_dtype_ops']} | {ext} |")
        print("fused kernels: " + "; ".join(r["fused_kernels"]))


if __name__ == "__main__":
    main()
