"""VideoMAE fine-tuning: test views, multi-view averaging, and 1 epoch on the embedded VP9 clips from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from fastmae.data.video import VideoItem
from fastmae.eval import video
from fastmae.methods.videomae import videomae_vit_tiny

SMALL = ["--img_size=32", "--num_frames=4", "--frame_stride=2", "--num_clips=2", "--num_crops=3", "--batch_size=4",
         "--eval_batch_size=2", "--epochs=1", "--progress=false", "--quiet=true"]


def test_views_cover_time_and_the_long_side():
    item = VideoItem("x.webm", 0, num_frames=40, width=120, height=80, codec="vp9")
    views = video.view_windows(item, span=10, num_clips=3, num_crops=3)
    assert [s for s, _ in views] == [0] * 3 + [15] * 3 + [30] * 3  # first, middle and last window
    assert [c for _, c in views[:3]] == [(0, 0, 80, 80), (20, 0, 80, 80), (40, 0, 80, 80)]  # left, center, right
    assert video.view_windows(item, 10, 1, 1) == [(15, (20, 0, 80, 80))]


def test_multiview_averages_probabilities_per_clip():
    logits = torch.randn(6, 5)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    out = video.MultiView(Fixed(), views=3)(torch.zeros(6))
    want = logits.softmax(-1).reshape(2, 3, 5).mean(1).log()
    torch.testing.assert_close(out, want)


def test_one_epoch_from_a_videomae_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    mae = videomae_vit_tiny(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2)
    path = tmp_path / "videomae.pt"
    cfg = {"model": "videomae_vit_tiny", "img_size": 32, "patch_size": 8, "num_frames": 4}
    torch.save({"model": mae.state_dict(), "config": cfg}, path)
    # the checkpoint's encoder is what gets fine-tuned (embed_dim/depth come from its weights' shapes via the config)
    ecfg = video.VideoFinetuneConfig.from_flat(ckpt=str(path), img_size=32, num_frames=4)
    with pytest.raises(ValueError, match="checkpoint does not fit"):
        video.build_video_classifier(ecfg, mae.state_dict(), {"config": {**cfg}}, 6)  # tiny is 192 wide, this 32
    out = tmp_path / "run"
    mae_full = videomae_vit_tiny(img_size=32, num_frames=4)
    torch.save({"model": mae_full.state_dict(), "config": cfg}, path)
    rc = video.main([f"--ckpt={path}", *SMALL, f"--output_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["views"] == 6 and res["n_val"] == 6 and res["history"][0]["val_n"] == 6  # one val clip per class
    assert 0 <= res["top1"] <= res["top5"] <= 1
    model, _ = video.build_video_classifier(ecfg, mae_full.state_dict(), {"config": cfg}, 6)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, mae_full.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)["model"]
    assert "fc_norm.weight" in ck and "head.weight" in ck and not any(k.startswith("decoder") for k in ck)
