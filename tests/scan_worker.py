"""Run by tests/test_scan_once.py as one of N gloo ranks: builds a rank-sharded loader and reports how many files
this rank checked. Usage: scan_worker.py DATA INDEX_DIR OUT_JSON (RANK, WORLD_SIZE, MASTER_* from the environment)."""

import json
import sys

import torch.distributed as dist

from fastmae.data import build_loader, sources


def main(data: str, index_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    checked = []
    real = sources._check_file
    sources._check_file = lambda path, min_size: (checked.append(path), real(path, min_size))[1]
    try:
        ld = build_loader(data, split="train", batch_size=2, img_size=16, num_workers=0, rank=dist.get_rank(),
                          world_size=dist.get_world_size(), index_cache=index_dir)
        result = {"checked": len(checked), "files": len(ld.source), "bad": [b for b, _ in ld.source.bad],
                  "sizes": ld.source.sizes, "labels": ld.source.labels}
    except ValueError as e:
        result = {"checked": len(checked), "error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
