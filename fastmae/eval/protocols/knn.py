"""k-NN on frozen features: cosine similarity and the temperature-weighted vote DINO popularised.

Each test image's k nearest training images (cosine similarity ``s`` of the L2-normalized pooled features,
the probe's features) vote for their labels with weight ``exp(s / T)``; the class with the largest sum is the
prediction (top-5: the five largest). Defaults k = 20, T = 0.07 (Caron et al. 2021; Wu et al. 2018). Nothing
trains: the encoder runs once over each split.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastmae.engine.distributed import DistInfo
from fastmae.engine.monitor import knn_scores
from fastmae.engine.step import resolve_precision
from fastmae.eval.config import KnnConfig
from fastmae.eval.data import IGNORE, TensorLoader
from fastmae.eval.models import read_source, resolve_arch
from fastmae.eval.protocol import (
    build_classifier,
    build_data,
    encode,
    format_result,
    run_in_folder,
    stored_features,
)
from fastmae.eval.protocols.registry import ProtocolSpec, register_protocol
from fastmae.flags import run_cli

PRESETS: dict[str, dict] = {"digits": {}}


def loader_features(vit, loader, batch_size: int, amp_dtype, info: DistInfo) -> tuple[Tensor, Tensor]:
    """Features and labels of every sample of ``loader`` (all ranks' shards; validation padding dropped)."""
    if isinstance(loader, TensorLoader):  # in memory: every rank holds the whole split
        return encode(vit, loader.x, batch_size, amp_dtype), loader.y
    feats, labels = [], []
    loader.set_epoch(0)
    for imgs, y in loader:
        keep = y != IGNORE
        feats.append(encode(vit, imgs.to(info.device)[keep.to(info.device)], batch_size, amp_dtype))
        labels.append(y[keep].to(info.device))
    f, y = torch.cat(feats), torch.cat(labels)
    if info.enabled:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, (f.cpu(), y.cpu()))
        f = torch.cat([g[0] for g in gathered]).to(info.device)
        y = torch.cat([g[1] for g in gathered]).to(info.device)
    return f, y


def _labelled_rows(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """The stored rows whose image decoded (label not IGNORE), on ``device``."""
    keep = y != IGNORE
    return torch.from_numpy(np.ascontiguousarray(x[keep])).to(device), torch.from_numpy(y[keep]).to(device)


def run_knn(cfg: KnnConfig, split=None, source_sd=None, source_meta=None) -> dict:
    return run_in_folder(cfg, lambda info, run_dir, write, preemption: _knn(cfg, info, split, source_sd, source_meta,
                                                                             run_dir, preemption))


def _knn(cfg: KnnConfig, info: DistInfo, split, source_sd, source_meta, run_dir=None, preemption=None) -> dict:
    amp_dtype = resolve_precision(cfg.step.precision, info.device, cpu_auto="fp32")
    torch.manual_seed(cfg.seed)  # --ckpt=random: the same random encoder as the other protocols' at this seed
    sd, meta = read_source(cfg.model.ckpt) if source_sd is None else (source_sd, source_meta or {})
    arch = resolve_arch(sd, meta, asdict(cfg.model))
    # k-NN has no training split to carve: the test split is scored once, nothing is chosen on it.
    data = build_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0)), arch, info, split)
    vit, _ = build_classifier(arch, sd, data.num_classes, tune_blocks=0, global_pool=cfg.model.global_pool, drop_path=0.0,
                              learn_pos_embed=False, mean=data.mean, std=data.std)
    vit.to(info.device)
    if cfg.data.features != "off" and data.augment == "eval":  # streamed, the eval transform: from the store
        arrays = stored_features(vit, data, cfg, info, amp_dtype, run_dir, preemption)
        if arrays is None:
            return {"status": "preempted", "step": 0}
        (train_f, train_y), (test_f, test_y) = (_labelled_rows(*arrays[s], info.device) for s in ("train", "val"))
    else:
        train_f, train_y = loader_features(vit, data.train, cfg.optim.eval_batch_size, amp_dtype, info)
        test_f, test_y = loader_features(vit, data.val, cfg.optim.eval_batch_size, amp_dtype, info)
    scores = knn_scores(train_f, train_y, test_f, data.num_classes, cfg.protocol.knn_k, cfg.protocol.knn_temperature)
    top = scores.topk(min(5, data.num_classes), dim=1).indices
    hits = top == test_y[:, None]
    n = len(test_y)
    top1, top5 = hits[:, 0].float().mean().item(), hits.any(dim=1).float().mean().item()  # deliberate sync: the result
    reported = f"test top-1 of the {cfg.protocol.knn_k}-NN vote (T={cfg.protocol.knn_temperature:g}) on frozen features"
    return {"status": "done", "protocol": "knn", "top1": top1, "top5": top5, "top1_last": top1, "top5_last": top5,
            "epoch": 0, "epochs_run": 0, "reported": reported, "history": [], "n_val": n, "n_train": len(train_y),
            "source": cfg.model.ckpt if source_sd is None else "<in memory>", "arch": arch, "data": data.kind,
            "chance": 1.0 / data.num_classes, "rank": info.rank}


def _body(cfg: KnnConfig) -> int:
    r = run_knn(cfg)
    if r.get("status") != "preempted" and r["rank"] == 0:
        print(format_result(r, cfg.output_dir))
    return 0


def main(argv: list[str]) -> int:
    """``fastmae knn``: k-NN top-1 of a frozen encoder (e.g. ``fastmae knn --ckpt=runs/mae-tiny``)."""
    return run_cli(argv, KnnConfig, PRESETS, _body, "knn", sys.modules[__name__].__doc__)


register_protocol(ProtocolSpec(
    name="knn", help="k-NN on frozen features (cosine, exp(sim/T) vote; k=20, T=0.07)", config=KnnConfig,
    presets=PRESETS, run=run_knn, frozen=True, demo=("k-NN (k=20, T=0.07)", "", {})))
