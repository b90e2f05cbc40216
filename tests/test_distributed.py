"""DDP on 2 gloo processes: ranks stay identical and match one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
ROOT = HERE.parent


def _torchrun(nproc: int, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def test_ddp_two_ranks_equal_each_other_and_single_process(tmp_path):
    r = _torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path / "ddp"), "8", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one"), "8", "3"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"ddp{i}.pt", weights_only=True) for i in (0, 1))
    one = torch.load(tmp_path / "one0.pt", weights_only=True)
    # (a) every rank holds the same parameters, bit for bit
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks diverged at {k}"
    # (b) the all-reduced gradient is the single-process gradient of the same global batch
    for k, g in one["grads"].items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(r0["grads"][k] / scale, g / scale, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # ... and so are the parameters after the steps. Adam moves every weight by about lr * sign(grad), so
    # a gradient that is zero in exact arithmetic (the key bias: softmax ignores it) is pure rounding noise
    # and moves by a random +-lr; those slices are excluded, everything else must agree to 2% of lr * steps.
    for k, p in one["params"].items():
        got = r0["params"][k]
        if k.endswith("attn.qkv.bias"):
            d = p.shape[0] // 3
            p, got = torch.cat([p[:d], p[2 * d:]]), torch.cat([got[:d], got[2 * d:]])
        torch.testing.assert_close(got, p, rtol=0, atol=6e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The steps did move the weights (the comparison is not between two untouched models).
    torch.manual_seed(0)
    from fastmae import mae_vit_tiny

    init = mae_vit_tiny(img_size=32, patch_size=4).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], one["params"]["blocks.0.attn.qkv.weight"])


def test_train_py_under_torchrun_shards_and_checkpoints_on_rank0(tmp_path, demo_dir):
    out = tmp_path / "run"
    r = _torchrun(2, "train.py", f"--data={demo_dir}", f"--output_dir={out}", "--img_size=32", "--patch_size=4",
                  "--batch_size=4", "--max_steps=3", "--log_every=1", "--ckpt_every=2", "--progress=false",
                  "--precision=fp32", "--num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-00000003.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # one RNG state per rank
    assert ckpt["config"]["batch_size"] == 4
    assert (out / "metrics.jsonl").read_text().count("\n") == 3  # rank 0 logs alone


def test_fsdp2_checkpoints_are_full_official_state_dicts_and_resume(tmp_path, demo_dir):
    out = tmp_path / "fsdp"
    common = ["train.py", f"--data={demo_dir}", f"--output_dir={out}", "--img_size=32", "--patch_size=4", "--batch_size=4",
              "--log_every=1", "--ckpt_every=2", "--progress=false", "--precision=fp32", "--num_workers=0", "--fsdp=true"]
    r = _torchrun(2, *common, "--max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(2, *common, "--max_steps=3", "--resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint-00000002.pt" in r.stdout
    from fastmae import mae_vit_tiny

    sd = torch.load(out / "checkpoint-00000003.pt", weights_only=True)["model"]
    assert all(type(v) is torch.Tensor for v in sd.values())  # gathered, not DTensor shards
    mae_vit_tiny(img_size=32, patch_size=4).load_state_dict(sd, strict=True)
