"""Resolve a run for a target machine without touching a GPU: layout, memory, kernels, time.

``fastmae plan --preset=base --device=cuda --world_size=8 --gpu=h100`` (and
``fastmae pretrain ... --dry_run``) prints what the run would do: per-GPU batch,
accumulation, learning rate, compile mode and whether CUDA graphs are on (and
why not), attention kernel per encoder/decoder shape, precision, parameter
count (model built on the meta device), FLOPs per image, memory per GPU, and a
roofline estimate of img/s and wall time.

Two decisions here guard the first GPU run:

- :func:`resolve_layout` reaches the effective batch with GPUs before
  accumulation, sized by an activation-memory model, and turns CUDA graphs off
  whenever ``accum_iter > 1``: gradients accumulated across replays of a
  graphed backward live in the graph's memory pool (pytorch/pytorch#169545;
  silently wrong sums in #96693).
- :func:`estimate_step` is a roofline of one step (GEMMs at an assumed
  efficiency, attention at another, elementwise bytes at memory bandwidth),
  the same model as DESIGN.md's step table; its assumptions print with it.
  The plan prints a range between two named assumption sets
  (:data:`PESSIMISTIC`, :data:`OPTIMISTIC`) with glue and communication
  (:func:`communication`) added; each term is one function, so a lever is one
  more function and one more field of :class:`Assumptions`.
- Methods other than MAE are planned from their own step, traced on fake
  tensors (:func:`trace_step`): counted FLOPs and saved bytes, never MAE's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastmae.engine.flops import GPUS, GpuSpec, gpu_spec, mae_forward_flops
from fastmae.models.mae import MODELS, MaskedAutoencoderViT, create_model

# ---- assumptions of the memory and time models (printed with every plan) ----------------------------------------

# Usable share of device memory: the caching allocator and NCCL keep the rest.
MEM_USABLE = 0.92
# CUDA context, cuBLAS/cuDNN workspaces, compile autotuning buffers.
FIXED_OVERHEAD_GIB = 1.5
# GEMMs at 60% of the dense peak: DESIGN.md's ViT-B estimate (decoder K/N = 512 sit below H100's balance point).
GEMM_EFF = 0.60
# Attention at 15% of peak: 50- and 197-token sequences with 64- and 32-dim heads (DESIGN.md: ~4.5 ms of a ViT-B step).
ATTN_EFF = 0.15
# Streaming kernels reach ~75% of HBM bandwidth.
BW_EFF = 0.75
# Norm/bias/GELU/residual/cast traffic per token-channel per block, forward + backward, eager with an fp32
# residual (DESIGN.md: ~143 B, ~46 GB per ViT-B step at batch 256). A bf16 residual halves 8 fp32 accesses.
ELEMENTWISE_BYTES_EAGER = 143.0
BF16_RESIDUAL_SAVING = 16.0
# Inductor fuses casts into norms and bias+GELU+residual chains: assumed 30% fewer bytes (unmeasured).
COMPILE_ELEMENTWISE_FACTOR = 0.70
# Fused AdamW: read param, grad, m, v; write param, m, v (28 B) + the gradient norm's read (4 B), fp32.
OPTIMIZER_BYTES_PER_PARAM = 32.0
# fp32 param + fp32 grad + AdamW m and v = 16 B; autocast's bf16 weight copies 2 B.
STATE_BYTES_PER_PARAM = 16.0
CAST_BYTES_PER_PARAM = 2.0
# DALI with nvJPEG decodes ~6,000-7,000 ImageNet JPEGs/s per A100/H100 (DESIGN.md); the model caps at this.
LOADER_IMG_S = 6500.0
IMAGENET_TRAIN_IMAGES = 1_281_167

# nvJPEG decode buffers, DALI's 2-deep prefetch of uint8 batches and its pinned staging (unmeasured; DALI loader only).
DALI_MEM_GIB = 2.0

ASSUMPTIONS = (
    f"roofline (DESIGN.md's table): GEMMs at {GEMM_EFF:.0%} of the dense bf16 peak, attention at {ATTN_EFF:.0%}, "
    "no glue, communication hidden",
    f"norm/bias/GELU/residual/cast traffic {ELEMENTWISE_BYTES_EAGER:.0f} B per token-channel per block (fwd+bwd, eager, "
    f"fp32 residual; -{BF16_RESIDUAL_SAVING:.0f} B with a bf16 residual; x{COMPILE_ELEMENTWISE_FACTOR} compiled, unmeasured) "
    f"at {BW_EFF:.0%} of HBM bandwidth",
    f"fused AdamW + norm {OPTIMIZER_BYTES_PER_PARAM:.0f} B/param at the same bandwidth",
    f"memory: {MEM_USABLE:.0%} of the device usable (allocator fragmentation and NCCL buffers keep the rest), "
    f"{FIXED_OVERHEAD_GIB} GiB fixed (context, workspaces), DALI {DALI_MEM_GIB} GiB with loader=dali, "
    f"{STATE_BYTES_PER_PARAM:.0f}+{CAST_BYTES_PER_PARAM:.0f} B/param of state, saved activations counted per block",
    f"data: an epoch = {IMAGENET_TRAIN_IMAGES:,} images (ImageNet-1k train)",
)


# ---- model shape -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an MAE that the memory and time models need."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float
    mask_ratio: float

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """{"encoder"/"decoder": (head_dim, tokens)} as the attention kernels see them."""
        return {
            "encoder": (self.embed_dim // self.num_heads, 1 + self.num_visible),
            "decoder": (self.decoder_embed_dim // self.decoder_num_heads, 1 + self.num_patches),
        }


def model_shape(model, img_size: int, mask_ratio: float) -> ModelShape:
    """Read the shape off a (meta-device) MaskedAutoencoderViT."""
    enc, dec = model.blocks[0], model.decoder_blocks[0]
    return ModelShape(
        img_size=img_size, patch_size=model.patch_size, in_chans=model.in_chans, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=enc.attn.num_heads, decoder_embed_dim=model.decoder_embed_dim,
        decoder_depth=len(model.decoder_blocks), decoder_num_heads=dec.attn.num_heads,
        mlp_ratio=enc.mlp.fc1.out_features / model.embed_dim, mask_ratio=mask_ratio,
    )


def build_meta_model(model_name: str, img_size: int, patch_size: int = 0):
    """The MAE on the meta device: shapes and parameter count without allocating a byte."""
    if model_name not in MODELS:
        # The roofline and memory models describe the MAE encoder-decoder step only.
        raise ValueError(f"fastmae plan models MAE runs only; {model_name!r} is not one of {sorted(MODELS)}")
    kw = {"img_size": img_size, **({"patch_size": patch_size} if patch_size else {})}
    with torch.device("meta"):
        return create_model(model_name, **kw)


# ---- memory ----------------------------------------------------------------------------------------------------


def _block_saved_bytes(tokens: int, dim: int, heads: int, mlp_ratio: float, residual_bytes: int, eager_attn: bool) -> float:
    """Bytes one pre-norm block saves for backward per image under bf16 autocast.

    norm1 input (residual dtype), qkv input (bf16) and output (3 x bf16), attention output (bf16, + fp32 log-sum-exp
    per head and token for flash kernels), norm2 input (residual dtype), fc1 input (bf16), fc1 output and fc2 input
    (mlp_ratio x bf16 each). Eager attention also keeps the fp32 softmax and its bf16 copy (T x T per head).
    """
    per_tc = 2 * residual_bytes + 2 + 6 + 2 + 2 + 4 * mlp_ratio
    saved = tokens * dim * per_tc + 4 * heads * tokens
    if eager_attn:
        saved += heads * tokens * tokens * (4 + 2)
    return saved


def activation_bytes_per_image(shape: ModelShape, residual_dtype: str = "fp32", attention: str = "auto") -> float:
    """Saved activations of one training image (encoder, decoder, patch/pred/loss tensors), bf16 autocast."""
    res = 4 if residual_dtype == "fp32" else 2
    eager = attention == "eager"
    t_enc, t_dec = 1 + shape.num_visible, 1 + shape.num_patches
    total = shape.depth * _block_saved_bytes(t_enc, shape.embed_dim, shape.num_heads, shape.mlp_ratio, res, eager)
    total += shape.decoder_depth * _block_saved_bytes(
        t_dec, shape.decoder_embed_dim, shape.decoder_num_heads, shape.mlp_ratio, res, eager
    )
    # K1 patches (bf16), embed output, decoder_embed in/out, K2 output, pred (bf16) and K3's fp32 gradient.
    total += shape.num_visible * shape.patch_dim * 2 + t_enc * shape.embed_dim * (res + 2)
    total += t_enc * shape.decoder_embed_dim * 2 + t_dec * shape.decoder_embed_dim * res
    total += shape.num_patches * shape.patch_dim * (2 + 4)
    total += shape.img_size**2 * shape.in_chans  # the uint8 batch
    return float(total)


def state_bytes(n_params: int, fsdp: bool, world_size: int) -> float:
    """Parameters, gradients, AdamW moments (sharded under FSDP) and autocast's bf16 weight copies."""
    shard = world_size if fsdp else 1
    return n_params * (STATE_BYTES_PER_PARAM / shard + CAST_BYTES_PER_PARAM)


def max_batch_that_fits(act_per_image: float, state: float, gpu_mem_gib: float, reserved_gib: float = 0.0) -> int:
    """Images whose activations fit beside the state, the fixed overhead and ``reserved_gib`` (e.g. DALI's buffers)."""
    budget = gpu_mem_gib * 2**30 * MEM_USABLE - (FIXED_OVERHEAD_GIB + reserved_gib) * 2**30 - state
    return max(int(budget // act_per_image), 0)


# ---- layout ----------------------------------------------------------------------------------------------------

GRAPHS_FSDP_REASON = "CUDA graphs are known to fail with FSDP (pytorch/pytorch#127225)"
GRAPHS_DDP_REASON = ("DDP with CUDA graphs has a history of failures (pytorch/pytorch#113809, #128218), and at hundreds of "
                     "images per GPU the launch overhead graphs remove is already hidden")
GRAPHS_ACCUM_REASON = (
    "gradients accumulated across CUDA-graph replays live in the graph's memory pool "
    "(pytorch/pytorch#169545; silently wrong sums in #96693)"
)


@dataclass(frozen=True)
class Layout:
    batch_size: int  # per GPU (per process) and micro-step
    accum_iter: int
    eff_batch: int  # batch_size * accum_iter * world_size
    cuda_graphs: bool
    compile_mode: str  # "reduce-overhead" | "default" | "max-autotune-no-cudagraphs" | "none"
    reason: str  # why CUDA graphs are (not) on; log it
    note: str  # how the batch was split (or a memory warning)
    max_batch: int | None  # the memory model's largest per-GPU batch (None off-GPU)


def _smallest_split(per_gpu: int, max_batch: int) -> tuple[int, int] | None:
    """(batch, accum) with batch * accum == per_gpu, batch <= max_batch, accum as small as possible."""
    for accum in range(1, per_gpu + 1):
        if per_gpu % accum == 0 and per_gpu // accum <= max_batch:
            return per_gpu // accum, accum
    return None


def resolve_layout(
    shape: ModelShape | None,
    n_params: int,
    *,
    target_eff_batch: int,
    world_size: int,
    device_type: str,
    gpu_mem_gib: float | None,
    compile: bool,
    cuda_graphs: str | bool,
    batch_size: int,
    accum_iter: int,
    fsdp: bool = False,
    residual_dtype: str = "fp32",
    attention: str = "auto",
    reserved_gib: float = 0.0,
    act_per_image: float | None = None,  # saved bytes per sample of a traced method (no MAE shape)
    compile_mode: str = "auto",
) -> Layout:
    """Per-GPU batch, accumulation and CUDA-graph decision. Pure: no device is touched.

    ``target_eff_batch > 0`` on CUDA: the per-GPU share of the target is split into the largest batch the memory
    model fits and the fewest accumulation steps. ``target_eff_batch == 0``, or off-GPU: ``batch_size`` and
    ``accum_iter`` as given (off-GPU with a target, ``batch_size`` caps the micro-batch). Raises ValueError for a
    target the world size cannot split or a model that does not fit one image.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    max_batch = None
    note = ""
    if device_type == "cuda" and gpu_mem_gib and (shape is not None or act_per_image):
        act = act_per_image or activation_bytes_per_image(shape, residual_dtype, attention)
        max_batch = max_batch_that_fits(act, state_bytes(n_params, fsdp, world_size), gpu_mem_gib, reserved_gib)
        if max_batch < 1:
            raise ValueError(f"one image needs {act / 2**30:.1f} GiB of activations beyond the model state: "
                             f"it does not fit {gpu_mem_gib:.0f} GiB")
    if target_eff_batch > 0:
        if target_eff_batch % world_size:
            raise ValueError(f"eff_batch {target_eff_batch} is not divisible by world_size {world_size}")
        per_gpu = target_eff_batch // world_size
        cap = max_batch if max_batch is not None else batch_size
        batch, accum = _smallest_split(per_gpu, cap)  # cap >= 1, so accum == per_gpu always qualifies
        why = "the memory model's limit" if max_batch is not None else "batch_size"
        note = f"{per_gpu} images per GPU per step; largest batch within {why}: {cap}"
    else:
        batch, accum = batch_size, accum_iter
        if max_batch is not None and batch > max_batch:
            note = f"warning: batch_size {batch} exceeds the memory model's {max_batch} per GPU"
    graphs, why_graphs = graphs_policy(device_type, compile, cuda_graphs, accum, world_size, fsdp)
    graphs, mode, why_graphs = _compile_mode(compile_mode, compile, graphs, why_graphs, device_type, accum)
    return Layout(batch, accum, batch * accum * world_size, graphs, mode, why_graphs, note, max_batch)


def graphs_policy(device_type: str, compile: bool, cuda_graphs: str | bool, accum: int, world_size: int,
                  fsdp: bool) -> tuple[bool, str]:
    """(CUDA graphs on?, the reason to log): only where the combination is known to work (DESIGN.md, hazards).

    ``cuda_graphs``: "auto" (one GPU), "on" (also under DDP, at the user's request), "off"; booleans as "auto"/"off".
    FSDP and gradient accumulation turn graphs off even when asked for.
    """
    choice = {True: "auto", False: "off"}.get(cuda_graphs, cuda_graphs) if isinstance(cuda_graphs, bool) else cuda_graphs
    if device_type != "cuda":
        return False, f"CUDA graphs off: device is {device_type}"
    if not compile:
        return False, "CUDA graphs off: compile is off (graphs come with compile's reduce-overhead mode)"
    if choice == "off":
        return False, "CUDA graphs off: cuda_graphs=off"
    if accum > 1:
        return False, f"CUDA graphs off: accum_iter={accum} > 1; {GRAPHS_ACCUM_REASON}"
    if world_size > 1 and fsdp:
        return False, f"CUDA graphs off under FSDP, even with cuda_graphs={choice}: {GRAPHS_FSDP_REASON}"
    if world_size > 1 and choice != "on":
        return False, f"CUDA graphs off under DDP ({world_size} processes) unless --cuda_graphs=on: {GRAPHS_DDP_REASON}"
    if world_size > 1:
        return True, "CUDA graphs on under DDP (--cuda_graphs=on, at your request): compile mode reduce-overhead"
    return True, "CUDA graphs on: one GPU, compile mode reduce-overhead, no accumulation"


def _compile_mode(asked: str, compile: bool, graphs: bool, why: str, device_type: str, accum: int) -> tuple[bool, str, str]:
    """(CUDA graphs, torch.compile mode, reason) from ``--compile_mode``: ``auto`` keeps the graph decision above;
    an explicit mode without graphs turns them off; ``reduce-overhead`` asked where graphs are unsafe is an error."""
    if asked == "auto":
        return graphs, "reduce-overhead" if graphs else ("default" if compile else "none"), why
    if not compile:
        raise ValueError(f"compile_mode={asked} needs --compile=true")
    if asked != "reduce-overhead":
        reason = why if not graphs else f"CUDA graphs off: compile_mode={asked}"
        return False, asked, reason
    if device_type == "cuda" and accum > 1:
        raise ValueError(f"compile_mode=reduce-overhead with accum_iter={accum}: {GRAPHS_ACCUM_REASON}; "
                         "reach the batch with more GPUs or use compile_mode=default")
    if not graphs and device_type == "cuda":
        raise ValueError(f"compile_mode=reduce-overhead is CUDA graphs, which are off here ({why})")
    return graphs, asked if graphs else "default", why


# ---- time ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """One end of the plan's range: every efficiency the time model assumes, by name (printed with the plan)."""

    label: str
    gemm_eff: float  # share of the dense bf16 peak the GEMMs reach
    attn_eff: float  # the same for attention (short sequences, 32/64-dim heads)
    compile_elementwise: float  # elementwise bytes left after Inductor's fusion (x the eager bytes)
    glue: float  # casts, DDP/FSDP copies, launch and Python gaps, as a share of the compute terms
    overlap: float  # share of gradient communication hidden behind the backward (never more than the backward)
    link_eff: float  # achieved share of the interconnect's nominal NCCL bus bandwidth
    loader_img_s: float  # what the data loader delivers per GPU


# DESIGN.md's step table: the roofline alone (no glue, communication hidden, a 6,500 img/s loader).
ROOFLINE = Assumptions("roofline", GEMM_EFF, ATTN_EFF, COMPILE_ELEMENTWISE_FACTOR, 0.0, 1.0, 1.0, LOADER_IMG_S)
# The range the plan prints. Pessimistic: the independent read of 2026-12-03 (GEMMs at 50% for K/N = 512/768
# shapes, 3.5-5 ms of casts, bucket copies and glue in a ~50 ms ViT-B step = ~10%, Inductor fusing less than hoped,
# half the communication exposed, NCCL at 60% of the link). Optimistic: DESIGN.md's roofline with 4% glue, 90% of
# the communication hidden and NCCL at 85% of the link. Unmeasured until a GPU report lands
# (bench/RESULTS.md, "GPU readiness and the plan").
OPTIMISTIC = Assumptions("optimistic", 0.58, 0.18, 0.70, 0.04, 0.90, 0.85, 7000.0)
PESSIMISTIC = Assumptions("pessimistic", 0.50, 0.12, 0.85, 0.10, 0.50, 0.60, 5500.0)


@dataclass(frozen=True)
class Interconnect:
    """Nominal NCCL all-reduce bus bandwidth per GPU (GB/s) inside a node and across nodes."""

    intra_label: str
    intra_gbs: float
    inter_label: str
    inter_gbs: float
    gpus_per_node: int


# NVLink generations (data sheets: H100/H200 SXM NVLink4 900 GB/s, A100 NVLink3 600 GB/s, B200 NVLink5 1.8 TB/s,
# bidirectional) at half for one direction; PCIe parts talk over PCIe Gen4/5 x16 (~25 GB/s achieved).
NVLINK_GBS = {"h100": 450.0, "h200": 450.0, "a100": 300.0, "a100_40gb": 300.0, "b200": 900.0}
PCIE_GBS = 25.0
# Across nodes: one NIC per GPU (DGX/HGX layout). ib400 = InfiniBand NDR / 400 GbE, ib200 = HDR, eth100 = 100 GbE.
NETWORKS = {"ib400": 50.0, "ib200": 25.0, "eth100": 12.5}


def interconnect_for(gpu: GpuSpec, network: str = "ib400", gpus_per_node: int = 8) -> Interconnect:
    intra = NVLINK_GBS.get(gpu.key)
    return Interconnect(f"NVLink ({gpu.label})" if intra else "PCIe", intra or PCIE_GBS, network, NETWORKS[network],
                        gpus_per_node)


@dataclass(frozen=True)
class CommEstimate:
    """Gradient and parameter traffic of one step on one GPU: what moves, over which link, and what stays exposed."""

    what: str  # e.g. "DDP all-reduce of 448 MB fp32 gradients"
    link: str
    bytes_per_gpu: float
    total_ms: float
    exposed_ms: float


@dataclass(frozen=True)
class StepEstimate:
    """Roofline of one optimizer step on one GPU (all accumulation micro-steps), milliseconds."""

    gemm_ms: float
    attention_ms: float
    elementwise_ms: float
    kernels_ms: float  # K1-K3
    optimizer_ms: float
    step_ms: float
    img_s: float  # per GPU, after the loader cap
    mfu: float
    data_bound: bool
    glue_ms: float = 0.0
    comm_ms: float = 0.0  # exposed communication
    label: str = "roofline"
    # The levers this run turns on that the terms above leave out (FP8 GEMMs, the decoder input's dtype, max-autotune
    # epilogues, a measured attention table): fastmae.engine.levers.planned_ms
    levers_ms: float = 0.0


def attention_flops_per_image(shape: ModelShape) -> float:
    """Forward QK^T and AV FLOPs per image (part of mae_forward_flops)."""
    t_enc, t_dec = 1 + shape.num_visible, 1 + shape.num_patches
    return 4.0 * (shape.depth * t_enc**2 * shape.embed_dim + shape.decoder_depth * t_dec**2 * shape.decoder_embed_dim)


def kernel_bytes_per_image(shape: ModelShape) -> float:
    """Ideal HBM traffic of K1-K3 per image, forward + backward (uint8 images, bf16 activations, fp32 loss grad)."""
    L, V, P = shape.num_patches, shape.num_visible, shape.patch_dim
    k1 = V * P * (1 + 2)  # read visible uint8 pixels, write bf16 patches
    k2 = 2 * ((1 + V) + (1 + L)) * shape.decoder_embed_dim * 2  # scatter forward, gather backward
    k3 = L * P * (2 + 4) + (L - V) * P  # read pred, write fp32 grad, read masked pixels
    return float(k1 + k2 + k3)


def gemm_ms(forward_flops: float, attn_fwd: float, images: int, gpu: GpuSpec, a: Assumptions) -> float:
    return 3 * (forward_flops - attn_fwd) * images / (gpu.peak_tflops * 1e12 * a.gemm_eff) * 1e3


def attention_ms(attn_fwd: float, images: int, gpu: GpuSpec, a: Assumptions) -> float:
    return 3.5 * attn_fwd * images / (gpu.peak_tflops * 1e12 * a.attn_eff) * 1e3  # backward recomputes the scores


def elementwise_ms(shape: ModelShape, images: int, gpu: GpuSpec, a: Assumptions, compile: bool, residual_dtype: str) -> float:
    per_tc = ELEMENTWISE_BYTES_EAGER - (BF16_RESIDUAL_SAVING if residual_dtype == "bf16" else 0.0)
    per_tc *= a.compile_elementwise if compile else 1.0
    token_channels = (shape.depth * (1 + shape.num_visible) * shape.embed_dim
                      + shape.decoder_depth * (1 + shape.num_patches) * shape.decoder_embed_dim)
    return per_tc * token_channels * images / _bw(gpu) * 1e3


def _bw(gpu: GpuSpec) -> float:
    return gpu.hbm_tbs * 1e12 * BW_EFF


def communication(n_params: int, world: int, fsdp: bool, hsdp: bool, grad_compression: str, link: Interconnect | None,
                  a: Assumptions, backward_ms: float) -> CommEstimate | None:
    """Per-step traffic of DDP (ring all-reduce of the gradients) or FSDP2 (bf16 parameter all-gather in forward and
    backward, fp32 gradient reduce-scatter; HSDP adds an all-reduce of the shard across nodes). Ring collectives
    move 2(W-1)/W (all-reduce) or (W-1)/W (gather/scatter) of the buffer through each GPU's slowest link."""
    if world <= 1 or link is None:
        return None
    nodes = max(1, -(-world // link.gpus_per_node))
    slow = link.inter_gbs if nodes > 1 else link.intra_gbs
    where = f"{link.inter_label} across {nodes} nodes" if nodes > 1 else link.intra_label
    ring = (world - 1) / world
    if not fsdp:
        grad_bytes = n_params * (2 if grad_compression == "bf16" else 4)
        moved, secs = 2 * ring * grad_bytes, 2 * ring * grad_bytes / (slow * 1e9 * a.link_eff)
        what = f"DDP all-reduce of {grad_bytes / 1e6:,.0f} MB {'bf16' if grad_compression == 'bf16' else 'fp32'} gradients"
    elif hsdp and nodes > 1:
        local = link.gpus_per_node
        inside = (local - 1) / local * n_params * (2 * 2 + 4)  # 2 bf16 all-gathers + an fp32 reduce-scatter, NVLink
        across = 2 * (nodes - 1) / nodes * n_params * 4 / local  # all-reduce of this GPU's fp32 shard across nodes
        moved = inside + across
        secs = inside / (link.intra_gbs * 1e9 * a.link_eff) + across / (link.inter_gbs * 1e9 * a.link_eff)
        what, where = f"HSDP: gather/scatter in the node, all-reduce of 1/{local} shards across {nodes} nodes", \
            f"{link.intra_label} + {link.inter_label}"
    else:
        moved = ring * n_params * (2 * 2 + 4)
        secs = moved / (slow * 1e9 * a.link_eff)
        what = "FSDP2: bf16 parameter all-gather (forward, backward) + fp32 gradient reduce-scatter"
    total = secs * 1e3
    hidden = min(a.overlap * total, backward_ms)  # overlap happens during the backward only
    return CommEstimate(what, where, moved, total, total - hidden)


def estimate_step(
    shape: ModelShape,
    n_params: int,
    forward_flops: float,
    layout: Layout,
    gpu: GpuSpec,
    compile: bool,
    residual_dtype: str = "fp32",
    assumptions: Assumptions = ROOFLINE,
    comm: Callable[[float], CommEstimate | None] | None = None,
    levers: Callable[[dict[str, float]], float] | None = None,
) -> StepEstimate:
    """Time of one step of ``layout`` on ``gpu`` under ``assumptions`` (default: DESIGN.md's roofline);
    ``forward_flops`` per image; ``comm(backward_ms)`` prices the step's communication (None: one GPU);
    ``levers(terms)`` the change the run's compute levers make to these terms (ms; None: none)."""
    a, images = assumptions, layout.batch_size * layout.accum_iter
    attn_fwd = attention_flops_per_image(shape)
    terms = dict(gemm_ms=gemm_ms(forward_flops, attn_fwd, images, gpu, a),
                 attention_ms=attention_ms(attn_fwd, images, gpu, a),
                 elementwise_ms=elementwise_ms(shape, images, gpu, a, compile, residual_dtype),
                 kernels_ms=kernel_bytes_per_image(shape) * images / _bw(gpu) * 1e3,
                 optimizer_ms=OPTIMIZER_BYTES_PER_PARAM * n_params / _bw(gpu) * 1e3)
    lever_ms = levers(terms) if levers else 0.0
    compute = sum(terms.values()) + lever_ms
    glue = a.glue * compute
    c = comm(compute * 2 / 3) if comm else None  # the backward is ~2/3 of the compute
    step = compute + glue + (c.exposed_ms if c else 0.0)
    compute_img_s = images / (step / 1e3)
    img_s = min(compute_img_s, a.loader_img_s)
    mfu = img_s * 3 * forward_flops / (gpu.peak_tflops * 1e12)
    return StepEstimate(**terms, step_ms=step, img_s=img_s, mfu=mfu, data_bound=compute_img_s > a.loader_img_s,
                        glue_ms=glue, comm_ms=c.exposed_ms if c else 0.0, label=a.label, levers_ms=lever_ms)


# ---- the whole plan --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    device: str
    gpu: str  # label of the target GPU, or "" off-GPU
    gpu_note: str
    world_size: int
    layout: Layout
    lr: float
    precision: str
    kernels: str
    attention: dict[str, str]
    n_params: int
    train_gflops_per_image: float | None  # None: the method counts none
    activation_gib: float | None  # per GPU at the layout's batch (None: no memory model for this model)
    state_gib: float  # params, grads, optimizer (sharded under FSDP), bf16 copies
    estimate: StepEstimate | None  # the roofline alone (DESIGN.md's table)
    total_images: int
    wall_hours: float | None
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)
    # (pessimistic, optimistic) ends of the printed range, with glue and communication; None off-GPU
    span: tuple[StepEstimate, StepEstimate] | None = None
    comm: tuple[CommEstimate | None, CommEstimate | None] = (None, None)
    reserved_gib: float = 0.0  # DALI's buffers
    trace_note: str = ""  # a method the plan could not trace: why
    levers: list[str] = field(default_factory=list)  # issue 22's per-lever lines (fastmae.engine.levers)


def _world_size(cfg) -> int:
    return cfg.plan.world_size or int(os.environ.get("WORLD_SIZE", "1"))


def _target(cfg) -> tuple[str, GpuSpec | None, float | None, str]:
    """(device type, GPU spec or None, device memory in GiB or None, a note on where the GPU came from)."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = device.split(":")[0]
    if device != "cuda":
        return device, None, None, ""
    if cfg.plan.gpu:
        return device, GPUS[cfg.plan.gpu], GPUS[cfg.plan.gpu].mem_gib, f"--gpu={cfg.plan.gpu}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        spec = gpu_spec(name)
        mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        if spec is not None:
            return device, spec, mem, f"this machine's {name}"
        return device, None, mem, f"this machine's {name} ({mem:.0f} GiB) has no entry in the peak table: no time estimate"
    return device, GPUS["h100"], GPUS["h100"].mem_gib, "no GPU here and no --gpu: assuming an H100 SXM"


def _resolve_for(cfg, shape: ModelShape | None, n_params: int, device: str, mem_gib: float | None, world: int,
                 act_per_image: float | None = None) -> Layout:
    from fastmae.layers.attention import attention_backend

    return resolve_layout(
        shape, n_params, target_eff_batch=cfg.optim.eff_batch, world_size=world, device_type=device, gpu_mem_gib=mem_gib,
        compile=cfg.step.compile, cuda_graphs=cfg.step.cuda_graphs, batch_size=cfg.optim.batch_size,
        accum_iter=cfg.optim.accum_iter, fsdp=cfg.step.fsdp, residual_dtype=cfg.step.residual_dtype,
        attention=attention_backend(), compile_mode=cfg.step.compile_mode,
        reserved_gib=DALI_MEM_GIB if cfg.data.loader == "dali" and device == "cuda" else 0.0, act_per_image=act_per_image,
    )


def layout_for(cfg, world_size: int | None = None) -> Layout:
    """The layout a training run of ``cfg`` uses on this machine (``world_size``: the launched processes).

    Call before building the loader; train with ``batch_size``/``accum_iter`` from it, compile with its
    ``compile_mode`` and log its ``reason``. MAE models only (others keep their configured split).
    """
    device, _, mem, _ = _target(cfg)
    try:
        model = build_meta_model(cfg.model.name, cfg.data.img_size, cfg.model.patch_size)
    except ValueError:
        # Not an MAE model: no memory model, so the configured split stands (capped by batch_size).
        return _resolve_for(cfg, None, 0, device, None, world_size or _world_size(cfg))
    shape = model_shape(model, cfg.data.img_size, cfg.model.mask_ratio)
    n_params = sum(p.numel() for p in model.parameters())
    return _resolve_for(cfg, shape, n_params, device, mem, world_size or _world_size(cfg))


def _target_caps(spec: GpuSpec | None):
    """Attention capabilities of the target: this machine's when it is the target, else the GPU's generation
    with the flash-attn packages as installed here."""
    import importlib.util

    from fastmae.layers.attention import AttnCaps, attention_capabilities

    here = attention_capabilities()
    if here.cuda or spec is None:
        return here
    sm = {"h100": 90, "h100_pcie": 90, "h100_nvl": 90, "h200": 90, "h200_nvl": 90, "l40s": 89, "b200": 100}.get(spec.key, 80)
    return AttnCaps(
        cuda=True, sm=sm,
        flash_attn_3=sm == 90 and importlib.util.find_spec("flash_attn_interface") is not None,
        flash_attn_2=importlib.util.find_spec("flash_attn") is not None,
        sdpa_cudnn=True, sdpa_flash=True, sdpa_efficient=True, sdpa_priority=here.sdpa_priority,
    )


def build_plan(cfg, model=None, flops_per_image: float | None = None, trace: TracedStep | None = None) -> Plan:
    """Everything a run of ``cfg`` would resolve to, for its target (``cfg.device``, ``cfg.plan.gpu``, ``cfg.plan.world_size``).

    ``model`` (meta device) and ``flops_per_image`` describe a model that is not an MAE (the caller asks the
    method registry): its plan has the layout, precision, parameters and FLOPs, but no memory model or time.
    """
    from fastmae import ops
    from fastmae.layers.attention import attention_backend, describe_attention

    device, spec, mem, note = _target(cfg)
    world = _world_size(cfg)
    if model is not None and not isinstance(model, MaskedAutoencoderViT):
        return _generic_plan(cfg, model, flops_per_image, device, spec, note, world, trace)
    model = build_meta_model(cfg.model.name, cfg.data.img_size, cfg.model.patch_size)
    n_params = sum(p.numel() for p in model.parameters())
    shape = model_shape(model, cfg.data.img_size, cfg.model.mask_ratio)
    fwd_flops = mae_forward_flops(model, cfg.data.img_size, cfg.model.mask_ratio)
    policy = attention_backend()
    layout = _resolve_for(cfg, shape, n_params, device, mem, world)
    precision = _precision(cfg, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    attention = describe_attention(shape.attention_shapes(), dtype, device, _target_caps(spec))
    act = activation_bytes_per_image(shape, cfg.step.residual_dtype, policy) * layout.batch_size
    estimate, span, comm = None, None, (None, None)
    if spec is not None:
        on = _planned_levers(cfg, shape, fwd_flops, layout, spec)
        estimate = estimate_step(shape, n_params, fwd_flops, layout, spec, cfg.step.compile, cfg.step.residual_dtype, levers=on)
        span, comm = _span(cfg, n_params, spec, world, lambda a, price: estimate_step(
            shape, n_params, fwd_flops, layout, spec, cfg.step.compile, cfg.step.residual_dtype, a, price, on))
    levers = _lever_lines(cfg, shape, fwd_flops, layout, spec, estimate)
    steps = cfg.schedule.max_steps or cfg.schedule.epochs * (IMAGENET_TRAIN_IMAGES // layout.eff_batch)
    total_images = steps * layout.eff_batch
    wall = total_images / (span[0].img_s * world) / 3600 if span else None
    return Plan(
        model=cfg.model.name, device=device, gpu=spec.label if spec else "", gpu_note=note, world_size=world, layout=layout,
        lr=cfg.optim.lr or cfg.optim.blr * layout.eff_batch / 256, precision=precision, kernels=ops.kernel_backend(device),
        attention=attention, n_params=n_params, train_gflops_per_image=3 * fwd_flops / 1e9,
        activation_gib=act / 2**30, state_gib=state_bytes(n_params, cfg.step.fsdp, world) / 2**30,
        estimate=estimate, total_images=total_images, wall_hours=wall, span=span, comm=comm, levers=levers,
        reserved_gib=DALI_MEM_GIB if cfg.data.loader == "dali" and device == "cuda" else 0.0,
    )


def _span(cfg, n_params: int, spec: GpuSpec, world: int, estimate: Callable[..., StepEstimate]):
    """The (pessimistic, optimistic) step estimates with glue and communication, and their communication;
    ``estimate(assumptions, price)`` is :func:`estimate_step` or :func:`estimate_traced` bound to the run."""
    link = interconnect_for(spec, cfg.plan.network, cfg.plan.gpus_per_node)
    out, comms = [], []
    for a in (PESSIMISTIC, OPTIMISTIC):
        price = lambda backward_ms, a=a: communication(n_params, world, cfg.step.fsdp, cfg.step.hsdp,
                                                       cfg.step.grad_compression, link,
                                                       a, backward_ms)
        est = estimate(a, price)
        out.append(est)
        comms.append(price((est.step_ms - est.glue_ms - est.comm_ms) * 2 / 3))  # as the estimate priced it
    return tuple(out), tuple(comms)


def _planned_levers(cfg, shape, fwd_flops, layout, spec) -> Callable[[dict[str, float]], float]:
    """The step-time change of the levers ``cfg`` turns on, given an estimate's terms (its GEMM and attention times)."""
    from fastmae.engine import levers
    from fastmae.layers.attention import attention_table

    table = attention_table(cfg.step.attention_table)
    return lambda terms: levers.planned_ms(cfg, shape, fwd_flops, layout.batch_size * layout.accum_iter, spec, terms,
                                           table)


def _lever_lines(cfg, shape, fwd_flops, layout, spec, estimate) -> list[str]:
    from fastmae.engine import levers
    from fastmae.layers.attention import attention_table

    if estimate is None:
        return []
    rows = levers.lever_rows(cfg, shape, fwd_flops, layout, spec, estimate, attention_table(cfg.step.attention_table))
    return levers.format_lever_rows(rows) + ["                  " + a for a in levers.LEVER_ASSUMPTIONS]


def _precision(cfg, device: str) -> str:
    if cfg.step.precision != "auto":
        return cfg.step.precision
    if device == "cuda":
        return "bf16"  # every GPU in the peak table computes bf16 natively
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _generic_plan(cfg, model, flops_per_image, device: str, spec: GpuSpec | None, note: str, world: int,
                  trace: TracedStep | None = None) -> Plan:
    """A method without an MAE shape: layout and parameters, and from ``trace`` (when it traced) FLOPs, memory and
    the time range; otherwise it says what is missing."""
    from fastmae import ops

    n_params = sum(p.numel() for p in model.parameters())
    traced = trace is not None and not trace.error
    # The configured split, as the run itself resolves it (layout_for has no trace); the memory line says whether it fits.
    layout = _resolve_for(cfg, None, n_params, device, None, world)
    steps = cfg.schedule.max_steps or cfg.schedule.epochs * (IMAGENET_TRAIN_IMAGES // layout.eff_batch)
    span, comm, act = None, (None, None), None
    if traced:
        flops_per_image = trace.gemm_flops + trace.attention_flops  # counted, forward + backward
        act = trace.saved_bytes * layout.batch_size / 2**30
        if spec is not None:
            span, comm = _span(cfg, n_params, spec, world,
                               lambda a, price: estimate_traced(trace, n_params, layout, spec, cfg.step.compile, a, price))
    roof = estimate_traced(trace, n_params, layout, spec, cfg.step.compile, ROOFLINE) if span else None
    total = steps * layout.eff_batch
    return Plan(
        model=cfg.model.name, device=device, gpu=spec.label if spec else "", gpu_note=note, world_size=world, layout=layout,
        lr=cfg.optim.lr or cfg.optim.blr * layout.eff_batch / 256, precision=_precision(cfg, device),
        kernels=ops.kernel_backend(device),
        attention={}, n_params=n_params, train_gflops_per_image=flops_per_image / 1e9 if flops_per_image else None,
        activation_gib=act, state_gib=state_bytes(n_params, cfg.step.fsdp, world) / 2**30,
        estimate=roof, total_images=total, wall_hours=total / (span[0].img_s * world) / 3600 if span else None,
        span=span, comm=comm, trace_note=trace.error if trace is not None else "",
    )


def format_plan(plan: Plan) -> str:
    lay, est = plan.layout, plan.estimate
    shapes = ", ".join(f"{k}: {v}" for k, v in plan.attention.items())
    gpu = f"{plan.gpu} ({plan.gpu_note})" if plan.gpu else (plan.gpu_note or "-")
    lines = [
        f"== fastmae plan: {plan.model} on {plan.world_size} x {plan.device} ==",
        f"target GPU        {gpu}",
        f"batch per GPU     {lay.batch_size} x accum_iter {lay.accum_iter} x world {plan.world_size} = "
        f"effective batch {lay.eff_batch}" + (f" ({lay.note})" if lay.note else ""),
        f"learning rate     {plan.lr:.4g}",
        f"compile mode      {lay.compile_mode}",
        f"cuda graphs       {lay.reason}",
        f"precision         {plan.precision}",
        f"kernels           {plan.kernels}",
        f"attention         {shapes or 'per-shape choice modelled for MAE only'}",
        f"parameters        {plan.n_params / 1e6:.1f} M",
        (f"train FLOPs/img   {plan.train_gflops_per_image:.1f} GFLOP (matmuls, 3x forward)" if plan.train_gflops_per_image
         else "train FLOPs/img   not counted for this method"),
        (f"memory per GPU    activations {plan.activation_gib:.1f} GiB + state {plan.state_gib:.1f} GiB"
         + (f" + DALI {plan.reserved_gib:.1f} GiB" if plan.reserved_gib else "")
         if plan.activation_gib is not None else
         f"memory per GPU    state {plan.state_gib:.1f} GiB (activations: the memory model covers MAE only)")
        + (f" (the model fits up to {lay.max_batch} images)" if lay.max_batch is not None else ""),
    ]
    if est is not None and plan.span is not None:
        lines += _range_lines(plan)
    else:
        why = ("no GPU target: pass --device=cuda --gpu=NAME" if not plan.gpu else
               f"its training step could not be traced ({plan.trace_note})" if plan.trace_note else
               "the method's step was not traced")
        lines.append(f"time estimate     none ({why})")
    ranged = [f"range ends: {a.label} = GEMMs {a.gemm_eff:.0%}, attention {a.attn_eff:.0%}, compiled elementwise "
              f"x{a.compile_elementwise}, glue {a.glue:.0%} of compute, {a.overlap:.0%} of communication hidden behind "
              f"the backward, NCCL at {a.link_eff:.0%} of the link, loader {a.loader_img_s:,.0f} img/s per GPU"
              for a in (PESSIMISTIC, OPTIMISTIC)] if plan.span else []
    lines.append("assumptions       " + "\n                  ".join((*plan.assumptions, *ranged)))
    return "\n".join(lines + plan.levers)


def _range_lines(plan: Plan) -> list[str]:
    """The step, communication, throughput and wall-time lines: a range (pessimistic - optimistic), not a point."""
    lo, hi = plan.span
    rf = plan.estimate
    terms = lambda e: (f"GEMM {e.gemm_ms:.1f} + attention {e.attention_ms:.1f} + elementwise {e.elementwise_ms:.1f} + "
                       f"K1-K3 {e.kernels_ms:.2f} + optimizer {e.optimizer_ms:.1f} + glue {e.glue_ms:.1f} + "
                       f"exposed communication {e.comm_ms:.1f}" + (f" + levers on {e.levers_ms:+.1f}" if e.levers_ms else ""))
    c_lo, c_hi = plan.comm
    if c_lo is None:
        comm = "none (one process)"
    else:
        comm = (f"{c_lo.what} over {c_lo.link}: {c_lo.bytes_per_gpu / 1e9:.2f} GB per GPU per step, "
                f"{c_hi.total_ms:.1f}-{c_lo.total_ms:.1f} ms, {c_hi.exposed_ms:.1f}-{c_lo.exposed_ms:.1f} ms exposed")
    bound = " - data-bound at the optimistic end: the loader caps it" if hi.data_bound else ""
    return [
        f"communication     {comm}",
        f"step estimate     {hi.step_ms:.1f}-{lo.step_ms:.1f} ms",
        f"  optimistic      {terms(hi)}",
        f"  pessimistic     {terms(lo)}",
        f"throughput        {lo.img_s:,.0f}-{hi.img_s:,.0f} img/s per GPU ({lo.mfu:.0%}-{hi.mfu:.0%} MFU), "
        f"{lo.img_s * plan.world_size:,.0f}-{hi.img_s * plan.world_size:,.0f} img/s in all{bound}; "
        f"the roofline alone: {rf.img_s:,.0f} img/s per GPU ({rf.step_ms:.1f} ms)",
        f"wall time         {plan.total_images / (hi.img_s * plan.world_size) / 3600:.1f}-{plan.wall_hours:.1f} h "
        f"for {plan.total_images:,} images",
    ]


# ---- any registered method: one step traced on fake tensors ------------------------------------------------------

# Elementwise traffic per byte of saved activations, calibrated on MAE ViT-B/16 (143 B per token-channel per block,
# 181 MB per image, over the 163 MB per image the trace saves): methods without a shape model borrow MAE's ratio.
ELEMENTWISE_PER_SAVED_BYTE = 1.11


@dataclass(frozen=True)
class TracedStep:
    """One training sample of any method, from a forward+backward on fake CPU tensors under bf16 autocast."""

    gemm_flops: float  # matmuls and convolutions, forward + backward
    attention_flops: float  # fused attention kernels, forward + backward
    saved_bytes: float  # activations autograd keeps for the backward
    error: str = ""  # why the step could not be traced (then the figures are 0)


def trace_step(make_model: Callable[[], torch.nn.Module], sample_shape: tuple[int, ...], mask_ratio: float,
               batch: int = 2) -> TracedStep:
    """FLOPs by kind and saved bytes per sample of ``make_model()``'s training step, without data or a device.

    The model is built and run under ``FakeTensorMode`` (shapes only), so whatever the method's model does (its
    own shapes, masks, decoder, loss) is what is counted: the plan never borrows MAE's numbers for another method.
    A forward that reads a tensor value on the host cannot be traced; the error says so."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    try:
        with torch.device("meta"):  # built outside the fake mode: initializers may read values (trunc_normal_, tolist)
            model = make_model()
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu")
            x = torch.empty((batch, *sample_shape))
            with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(x, mask_ratio=mask_ratio)[0]
                loss.backward()
    except Exception as e:  # a data-dependent op (a host sync) or an unsupported op: reported, never guessed
        return TracedStep(0.0, 0.0, 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    ops = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in ops.items() if "attention" in str(k))
    return TracedStep((sum(ops.values()) - attention) / batch, attention / batch, saved[0] / batch)


def estimate_traced(trace: TracedStep, n_params: int, layout: Layout, gpu: GpuSpec, compile: bool, a: Assumptions,
                    comm: Callable[[float], CommEstimate | None] | None = None) -> StepEstimate:
    """The step time of a traced method under ``a``: the same terms as :func:`estimate_step`, from counted FLOPs and
    saved bytes instead of an MAE shape."""
    images, peak = layout.batch_size * layout.accum_iter, gpu.peak_tflops * 1e12
    per_byte = ELEMENTWISE_PER_SAVED_BYTE * (a.compile_elementwise if compile else 1.0)
    terms = dict(gemm_ms=trace.gemm_flops * images / (peak * a.gemm_eff) * 1e3,
                 attention_ms=trace.attention_flops * images / (peak * a.attn_eff) * 1e3,
                 elementwise_ms=per_byte * trace.saved_bytes * images / _bw(gpu) * 1e3, kernels_ms=0.0,
                 optimizer_ms=OPTIMIZER_BYTES_PER_PARAM * n_params / _bw(gpu) * 1e3)
    compute = sum(terms.values())
    c = comm(compute * 2 / 3) if comm else None
    step = compute * (1 + a.glue) + (c.exposed_ms if c else 0.0)
    img_s = min(images / (step / 1e3), a.loader_img_s)
    flops = trace.gemm_flops + trace.attention_flops
    return StepEstimate(**terms, step_ms=step, img_s=img_s, mfu=img_s * flops / peak,
                        data_bound=images / (step / 1e3) > a.loader_img_s, glue_ms=compute * a.glue,
                        comm_ms=c.exposed_ms if c else 0.0, label=a.label)
