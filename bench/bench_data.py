"""Loader throughput: DALI (CPU pipeline here, mixed nvJPEG decode on CUDA) vs the torch/PIL loader.

    python bench/bench_data.py                         # 2 threads/workers, 224 px, batch 64, CPU
    python bench/bench_data.py --threads 8 --device cuda
    python bench/bench_data.py --setup                 # DALI per-epoch setup: one pipeline vs one per epoch

Both loaders run the same training augmentation (random-resized crop 0.2-1 with the same windows,
bicubic resize, flip) at the same thread / worker count, on two sets: ~500 generated ImageNet-like
JPEGs (real photo content from the packages' sample images, ~500x375, quality 90) and the embedded
demo set. Epochs are interleaved round-robin after one warm-up epoch each; the table reports the
median images/s over the measured epochs and the ratio to the PIL loader of the same run.
Markdown table to stdout, rows to bench/results/<bench>.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _harness import append_csv, stamp  # noqa: E402

from fastmae.data import build_loader, prepare_demo_dataset  # noqa: E402
from fastmae.data.demo import sample_photos  # noqa: E402
from fastmae.flags import underscores  # noqa: E402


def make_imagenet_like(root: Path, n: int = 500, classes: int = 10) -> Path:
    """n JPEGs of ~500x375 (+-10 %), q90, cut and rescaled from real photos; cached by (n, classes)."""
    out = root / f"inet-like-{n}-{classes}"
    if (out / "train").is_dir():
        return out
    tmp = root / f".tmp-{out.name}-{time.time_ns()}"
    photos = list(sample_photos().values())
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        tw, th = int(500 * rng.uniform(0.9, 1.1)), int(375 * rng.uniform(0.9, 1.1))
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(min(w, h * tw / th) * s), int(min(h, w * th / tw) * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(img[y : y + ch, x : x + cw]).resize((tw, th), Image.BICUBIC)
        d = tmp / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.jpg", quality=90)
    tmp.rename(out)
    return out


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds(loader) -> float:
    """CPU time of this process (all DALI threads) plus the torch loader's live worker processes.
    Unlike wall time, it barely moves when other jobs share the cores."""
    total = _proc_cpu(os.getpid())
    it = getattr(getattr(loader, "_dl", None), "_iterator", None)
    for w in getattr(it, "_workers", []) or []:
        try:
            total += _proc_cpu(w.pid)
        except (OSError, ValueError):
            pass
    return total


def run_epoch(loader) -> tuple[float, float]:
    """-> (images/s wall, CPU ms per image)."""
    c0, t0 = cpu_seconds(loader), time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # deliberate: the timer must include the last batch
    dt = time.perf_counter() - t0
    return n / dt, (cpu_seconds(loader) - c0) * 1e3 / n


def op_breakdown(root: Path, img_size: int, n: int = 64, rounds: int = 5) -> list[str]:
    """Single-thread CPU ms per image of each stage, on the same files and crop windows: where the
    loaders spend their time. CPU time (not wall) so that other jobs on the machine barely matter."""
    import io

    import torch.nn.functional as F
    from nvidia.dali import fn, pipeline_def, types

    from fastmae.data.augment import train_params
    from fastmae.data.sources import open_source

    src = open_source(root, "train", warn=False)
    ids = list(range(min(n, len(src))))
    datas = [src.read_bytes(i) for i in ids]
    params = [train_params(0, 0, i, *src.sizes[i]) for i in ids]
    crops = []
    for d, (x, y, w, h, _) in zip(datas, params, strict=True):
        crops.append(np.array(Image.open(io.BytesIO(d)).convert("RGB").crop((x, y, x + w, y + h))))

    def dali_pipe(stage: str, **rkw):
        enc = [np.frombuffer(d, np.uint8) for d in datas]
        anchors = [np.array(p[:2], np.float32) for p in params]
        shapes = [np.array(p[2:4], np.float32) for p in params]

        @pipeline_def(batch_size=len(ids), num_threads=1, device_id=None, exec_pipelined=False, exec_async=False)
        def pipe():
            if stage == "decode":
                e, a, s = fn.external_source(source=lambda: (enc, anchors, shapes), num_outputs=3, batch=True)
                return fn.decoders.image_slice(e, a, s, normalized_anchor=False, normalized_shape=False, output_type=types.RGB)
            x = fn.external_source(source=lambda: crops, batch=True, layout="HWC")
            return fn.resize(x, resize_x=img_size, resize_y=img_size, **rkw)

        p = pipe()
        p.build()
        p.run()
        return lambda: p.run()

    def pil_decode():
        for d in datas:
            Image.open(io.BytesIO(d)).load()

    pil_imgs = [Image.fromarray(c) for c in crops]

    def pil_resize():
        for im in pil_imgs:
            np.asarray(im.resize((img_size, img_size), Image.BICUBIC))

    tcrops = [torch.from_numpy(c).permute(2, 0, 1)[None] for c in crops]

    def torch_resize():
        for t in tcrops:
            F.interpolate(t, size=(img_size, img_size), mode="bicubic", antialias=True)

    stages = {
        "PIL decode (full image)": pil_decode,
        "DALI CPU ROI decode (crop window only)": dali_pipe("decode"),
        "PIL bicubic resize of the crop": pil_resize,
        "DALI CPU cubic+antialias resize of the crop": dali_pipe("resize", interp_type=types.INTERP_CUBIC, antialias=True),
        "DALI CPU triangular resize of the crop (diagnostic)": dali_pipe(
            "resize", min_filter=types.INTERP_TRIANGULAR, mag_filter=types.INTERP_CUBIC
        ),
        "torch uint8 bicubic+antialias resize (1 thread, for reference)": torch_resize,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cost: dict[str, list[float]] = {k: [] for k in stages}
    try:
        for _ in range(rounds):
            for k, f in stages.items():
                c0 = time.process_time()
                f()
                cost[k].append((time.process_time() - c0) * 1e3 / len(ids))
    finally:
        torch.set_num_threads(threads)
    return [f"| {k} | {statistics.median(v):.2f} |" for k, v in cost.items()]


def _per_sample_windows(seed: int, epoch: int, ids, sizes) -> list:
    """The previous crop-window draw, for reference: a numpy Generator per sample and a Python loop of up
    to ten attempts (torchvision's algorithm), one sample at a time on the main thread."""
    import math

    out = []
    for i in ids:
        rng = np.random.default_rng((seed, epoch, int(i), 0x41554721))
        width, height = sizes[i]
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(0.2, 1.0)
            ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < w <= width and 0 < h <= height:
                out.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h, rng.random() < 0.5))
                break
        else:
            out.append((0, 0, width, height, rng.random() < 0.5))
    return out


def setup_bench(root: Path, args) -> None:
    """DALI per-epoch setup: time from the start of an epoch's iteration to its first batch, and the whole
    epoch, with the one persistent pipeline vs a pipeline rebuilt at every epoch (the previous design),
    interleaved epoch by epoch; plus the main-thread cost of drawing a batch's crop windows."""
    from fastmae.data.augment import train_params_batch

    kw = dict(
        loader="dali",
        batch_size=args.batch,
        img_size=args.img_size,
        output=args.output,
        num_workers=args.threads,
        device=args.device,
    )
    loaders = {"one pipeline per loader": build_loader(root, **kw), "rebuilt every epoch (previous)": build_loader(root, **kw)}
    first: dict[str, list[float]] = {k: [] for k in loaders}
    whole: dict[str, list[float]] = {k: [] for k in loaders}
    for ld in loaders.values():
        run_epoch(ld)  # warm-up: first build, page cache
    for e in range(1, args.epochs + 1):
        for k, ld in loaders.items():
            if k.startswith("rebuilt"):
                ld._pipe = None  # what the previous loader did at every epoch start
                ld._inflight.clear()
            ld.set_epoch(e)
            t0 = time.perf_counter()
            it = iter(ld)
            x, _ = next(it)
            t1 = time.perf_counter()
            for batch in it:
                x = batch[0]
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)  # deliberate: the timer must include the last batch
            first[k].append(t1 - t0)
            whole[k].append(time.perf_counter() - t0)
    builds = {k: ld.builds for k, ld in loaders.items()}
    ref = "rebuilt every epoch (previous)"
    print(
        f"\nDALI per-epoch setup, {root.name}, batch {args.batch}, {args.img_size} px, {args.threads} threads, "
        f"device {args.device}, median of {args.epochs} epochs after 1 warm-up\n"
    )
    print("| pipeline | builds | epoch start -> first batch (ms) | whole epoch (ms) | first batch vs previous |")
    print("|---|---|---|---|---|")
    for k in loaders:
        f, w = statistics.median(first[k]) * 1e3, statistics.median(whole[k]) * 1e3
        print(f"| {k} | {builds[k]} | {f:.1f} | {w:.0f} | {f / (statistics.median(first[ref]) * 1e3):.3f}x |")
    src = loaders[ref].source
    ids = np.arange(min(len(src), args.batch))
    wh = np.asarray(src.sizes)[ids]
    cost = {"per-sample Generator + Python loop (previous)": [], "one vectorized call per batch": []}
    for _ in range(20):
        c0 = time.perf_counter()
        _per_sample_windows(0, 1, ids, src.sizes)
        c1 = time.perf_counter()
        train_params_batch(0, 1, ids, wh[:, 0], wh[:, 1])
        c2 = time.perf_counter()
        cost["per-sample Generator + Python loop (previous)"].append((c1 - c0) * 1e6 / len(ids))
        cost["one vectorized call per batch"].append((c2 - c1) * 1e6 / len(ids))
    base = statistics.median(cost["per-sample Generator + Python loop (previous)"])
    print(f"\ncrop windows of a batch of {len(ids)} on the main thread\n")
    print("| method | us per sample (median of 20) | vs previous |")
    print("|---|---|---|")
    for k, v in cost.items():
        print(f"| {k} | {statistics.median(v):.1f} | {statistics.median(v) / base:.3f}x |")


def packed_copy(root: Path, data_dir: Path, short_side: int) -> Path:
    """``fastmae data pack`` of ``root`` (cached: a second pack of the same data is a no-op)."""
    from fastmae.data.pack import PackConfig, pack

    dst = data_dir / f"{root.name}-pack{short_side}"
    pack(PackConfig(src=str(root), dst=str(dst), short_side=short_side, workers=2), log=lambda m: None)
    return dst


def new_path_loaders(root: Path, data_dir: Path, common: dict) -> dict:
    """The issue-21 paths as real torch loaders (workers, IPC and collate included)."""
    packed = data_dir / f"{root.name}-pack256"
    out = {"fast": ("torch workers, fast exact path (data.decode)", build_loader(root, decode="fast", **common)),
           "dali_roi": ("torch workers, DALI CPU ROI decode + torch resize (decode=dali_roi)",
                        build_loader(root, decode="dali_roi", **common))}
    if packed.is_dir():
        out["packed"] = ("torch workers, packed 256 + fast path", build_loader(packed, decode="fast", **common))
        out["packed_x2"] = (
            "torch workers, packed 256 + fast + repeat x2",
            build_loader(packed, decode="fast", repeat_samples=2, **common),
        )
    return out


def _dali_roi_decode(datas: list[bytes], windows: np.ndarray):
    """A one-thread DALI CPU pipeline that ROI-decodes each file's window: -> callable returning the crops."""
    from nvidia.dali import fn, pipeline_def, types

    enc = [np.frombuffer(d, np.uint8) for d in datas]
    anchors = [np.array(w[:2], np.float32) for w in windows]
    shapes = [np.array(w[2:4], np.float32) for w in windows]

    @pipeline_def(batch_size=len(datas), num_threads=1, device_id=None, exec_pipelined=False, exec_async=False)
    def pipe():
        e, a, s = fn.external_source(source=lambda: (enc, anchors, shapes), num_outputs=3, batch=True)
        return fn.decoders.image_slice(e, a, s, normalized_anchor=False, normalized_shape=False, output_type=types.RGB)

    p = pipe()
    p.build()
    p.run()
    return lambda: [np.asarray(t) for t in p.run()[0]]


def path_costs(root: Path, packed: Path, img_size: int, n: int) -> dict:
    """One thread, CPU ms per training sample of each path on the same n files (and, unpacked, the same
    windows); each callable does all of a sample's work from its bytes on disk to a uint8 224x224 crop."""
    from fastmae.data.dali_roi import RoiDataset
    from fastmae.data.decode import crops_from_image, decode_crops, decode_image, resize_flip
    from fastmae.data.loader import ImageDataset, _collate
    from fastmae.data.repeat import RepeatDataset
    from fastmae.data.sources import open_source

    src, psrc = open_source(root, "train", warn=False), open_source(packed, "train", warn=False)
    ids = np.arange(min(n, len(src), len(psrc)))
    n = len(ids)
    ds = {d: ImageDataset(src, img_size, "mae", 0, d) for d in ("pil", "fast")}
    pds = ImageDataset(psrc, img_size, "mae", 0, "fast")
    keys, pkeys = ds["pil"].batch_keys(1, ids), pds.batch_keys(1, ids)
    rep = {k: RepeatDataset(psrc, img_size, "mae", 0, "fast", k) for k in (2, 4)}
    rkeys = {k: r.batch_keys(1, (ids[:, None] * k + np.arange(k)).reshape(-1)) for k, r in rep.items()}
    windows = np.array([k[2] for k in keys], np.int64)
    dali_decode = _dali_roi_decode([src.read_bytes(int(i)) for i in ids], windows)
    roi = RoiDataset(src, img_size, "mae", 0, 64)
    rbatches = [keys[i:i + 64] for i in range(0, len(keys), 64)]
    rcrops = dali_decode()
    ritems = [item for b in rbatches for item in roi.__getitems__(b)]
    pbytes = [psrc.read_bytes(int(i)) for i in ids]
    pwin = np.array([k[2] for k in pkeys], np.int64)
    pdec = [decode_image(b) for b in pbytes]

    def roi_resize():
        return [resize_flip(torch.from_numpy(c).permute(2, 0, 1)[None], img_size, w[4]).contiguous()
                for c, w in zip(rcrops, windows, strict=True)]

    return {
        "today's PIL path (reference)": (lambda: [ds["pil"][k] for k in keys], 1),
        "fast exact path (PIL decode + torch uint8 resize)": (lambda: [ds["fast"][k] for k in keys], 1),
        "DALI CPU ROI decode + torch uint8 resize (`--decode=dali_roi`, a batch of 64 per call)": (
            lambda: [roi.__getitems__(b) for b in rbatches], 1),
        "dali_roi: read bytes (stage)": (lambda: [src.read_bytes(int(i)) for i in ids], 1),
        "dali_roi: DALI CPU ROI decode alone, one run (stage)": (dali_decode, 1),
        "dali_roi: torch resize + flip + contiguous HWC (stage)": (roi_resize, 1),
        "dali_roi: collate batches of 64 (stage)": (lambda: [_collate(ritems[i:i + 64]) for i in range(0, n, 64)], 1),
        f"packed ({packed.name}) + fast path": (lambda: [pds[k] for k in pkeys], 1),
        "packed + fast + repeat x2": (lambda: [rep[2][k] for k in rkeys[2]], 2),
        "packed + fast + repeat x4": (lambda: [rep[4][k] for k in rkeys[4]], 4),
        "packed: read bytes (stage)": (lambda: [psrc.read_bytes(int(i)) for i in ids], 1),
        "packed: PIL decode (stage)": (lambda: [decode_image(b) for b in pbytes], 1),
        "packed: crop out of PIL + torch resize + flip (stage)": (
            lambda: [crops_from_image(img, w[None], img_size, s) for (img, s), w in zip(pdec, pwin, strict=True)], 1),
        "packed: whole sample via decode_crops (stage sum check)": (
            lambda: [decode_crops(b, w[None], img_size) for b, w in zip(pbytes, pwin, strict=True)], 1),
    }


def path_table(root: Path, packed: Path, args, rounds: int = 7) -> None:
    """The goal table (one thread, CPU ms per sample, ratios to today's PIL path in the same run) and the cores
    one GPU needs at 4,400 and 8,500 img/s."""
    costs = path_costs(root, packed, args.img_size, min(args.images, 200))
    n = min(args.images, 200, len(open_source_names(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ms: dict[str, list[float]] = {k: [] for k in costs}
    try:
        for _ in range(rounds):  # round-robin: machine noise hits every path alike
            for k, (f, per) in costs.items():
                c0 = time.process_time()
                f()
                ms[k].append((time.process_time() - c0) * 1e3 / (n * per))
    finally:
        torch.set_num_threads(threads)
    ref = statistics.median(ms["today's PIL path (reference)"])
    print(f"\nCPU ms per training sample, 1 thread, {root.name} ({n} files), {args.img_size} px, RandomResizedCrop "
          f"0.2-1 + bicubic antialias + flip, uint8; median of {rounds} rounds; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores\n")
    print("| path | CPU ms/sample | range | vs today's PIL | samples/s per core | cores per GPU at 4,400 / 8,500 img/s |")
    print("|---|---|---|---|---|---|")
    rows = []
    for k, v in ms.items():
        m = statistics.median(v)
        stage = "(stage)" in k
        cores = "" if stage else f"{4400 * m / 1e3:.1f} / {8500 * m / 1e3:.1f}"
        print(f"| {k} | {m:.3f} | {min(v):.3f}-{max(v):.3f} | {ref / m:.2f}x faster | {1e3 / m:.0f} | {cores} |")
        rows.append({"bench": "data_paths", "path": k, "cpu_ms_per_sample": round(m, 4), "speedup_vs_pil": round(ref / m, 3),
                     "files": n, "img_size": args.img_size, **stamp(torch.device("cpu"))})
    if not args.no_csv:
        append_csv(rows)


def open_source_names(root: Path) -> list[str]:
    from fastmae.data.sources import open_source

    return open_source(root, "train", warn=False).names


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = torch DataLoader workers")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=5, help="measured epochs per loader (after 1 warm-up)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default="uint8", choices=["uint8", "float"])
    ap.add_argument("--data_dir", default="/tmp/fastmae-bench-data")
    ap.add_argument("--no_diagnostic", action="store_true", help="skip the DALI triangular-resize row")
    ap.add_argument("--no_csv", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also print a per-stage CPU-cost breakdown")
    ap.add_argument("--setup", action="store_true", help="only the DALI per-epoch setup comparison (demo set)")
    ap.add_argument("--no_paths", action="store_true", help="skip the one-thread per-path table and the new-path loaders")
    ap.add_argument("--paths_only", action="store_true", help="only the one-thread per-path table and cores per GPU")
    ap.add_argument("--short_side", type=int, default=256, help="short side of the packed copy (fastmae data pack)")
    return ap.parse_args(underscores(sys.argv[1:]))  # --img-size = --img_size, as in fastmae


def _loaders(root: Path, data_dir: Path, common: dict, args: argparse.Namespace) -> tuple[dict, dict, str]:
    """The contenders on one data set: (loaders, their table labels, DALI's decode mode)."""
    loaders = {kind: build_loader(root, loader=kind, **common) for kind in ("torch", "dali")}
    dali_mode = "mixed (nvJPEG)" if loaders["dali"].device_id is not None else "CPU"
    labels = {"torch": "torch/PIL workers", "dali": f"DALI {dali_mode}"}
    if root.name.startswith("inet-like") and not args.no_paths:
        for key, (label, ld) in new_path_loaders(root, data_dir, common).items():
            loaders[key], labels[key] = ld, label
    if not args.no_diagnostic:
        from fastmae.data.dali import DaliLoader
        from fastmae.data.sources import open_source

        src = open_source(root, "train", crop=args.img_size, warn=False)
        loaders["dali_tri"] = DaliLoader(
            src,
            resize_filter="triangular",
            train=True,
            shuffle=True,
            seed=0,
            rank=0,
            world_size=1,
            drop_last=True,
            **common,
        )
        labels["dali_tri"] = f"DALI {dali_mode}, triangular resize (diagnostic, not the MAE recipe)"
    return loaders, labels, dali_mode


def _measure(loaders: dict, epochs: int) -> tuple[dict, dict, dict]:
    """Img/s and CPU ms/img per loader, ``epochs`` round-robin epochs after a warm-up: (rates, medians, CPU medians)."""
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    cpu: dict[str, list[float]] = {k: [] for k in loaders}
    for ld in loaders.values():
        ld.set_epoch(0)
        run_epoch(ld)  # warm-up: worker start, pipeline build, page cache
    for e in range(1, epochs + 1):
        for k, ld in loaders.items():  # round-robin: machine noise hits every loader alike
            ld.set_epoch(e)
            r, c = run_epoch(ld)
            rates[k].append(r)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in rates.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    return rates, med, mcpu


def main() -> None:
    args = _parse_args()
    if args.setup:
        setup_bench(prepare_demo_dataset(Path(args.data_dir)), args)
        return

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        f"imagenet-like {args.images} x ~500x375": make_imagenet_like(data_dir, args.images),
        "demo (64-256 px crops)": prepare_demo_dataset(data_dir),
    }
    device = torch.device(args.device)
    load0 = os.getloadavg()[0]
    if not args.no_paths:
        inet = next(iter(sets.values()))
        path_table(inet, packed_copy(inet, data_dir, args.short_side), args)
        if args.paths_only:
            return
    common = dict(
        batch_size=args.batch,
        img_size=args.img_size,
        output=args.output,
        num_workers=args.threads,
        device=args.device,
    )
    rows, lines = [], []
    for set_name, root in sets.items():
        loaders, labels, dali_mode = _loaders(root, data_dir, common, args)
        rates, med, mcpu = _measure(loaders, args.epochs)
        n = loaders["torch"].steps_per_epoch * args.batch
        for k in loaders:
            lines.append(
                f"| {set_name} | {labels[k]} | {args.threads} | {med[k]:.0f} | "
                f"{min(rates[k]):.0f}-{max(rates[k]):.0f} | {med[k] / med['torch']:.2f}x | "
                f"{mcpu[k]:.2f} | {mcpu['torch'] / mcpu[k]:.2f}x |"
            )
        rows.append(
            {
                "bench": "data_loader",
                "config": f"{set_name} n={n} img={args.img_size} out={args.output}",
                "batch": args.batch,
                "threads": args.threads,
                "torch_pil_img_s": round(med["torch"], 1),
                "dali_img_s": round(med["dali"], 1),
                "dali_mode": dali_mode,
                "speedup_vs_pil": round(med["dali"] / med["torch"], 3),
                "torch_pil_cpu_ms_per_img": round(mcpu["torch"], 3),
                "dali_cpu_ms_per_img": round(mcpu["dali"], 3),
                **stamp(device),
            }
        )
    print(
        f"\nmedian of {args.epochs} epochs after 1 warm-up, batch {args.batch}, {args.img_size} px, "
        f"output {args.output}, train augmentation, device {args.device}; load average at start "
        f"{load0:.1f} on {os.cpu_count()} cores\n"
    )
    print("| data set | loader | threads | img/s (median) | range | vs PIL | CPU ms/img | CPU-efficiency vs PIL |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if args.ops:
        first = next(iter(sets.values()))
        print(f"\nper-stage CPU ms per image, 1 thread, {first.name}, {args.img_size} px output\n")
        print("| stage | CPU ms/img |")
        print("|---|---|")
        print("\n".join(op_breakdown(first, args.img_size)))
    if not args.no_csv:
        append_csv(rows)


if __name__ == "__main__":
    main()
