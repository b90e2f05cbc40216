"""Video data: decoded frames against known content (PyAV and DALI on CPU), clip sampling, exact resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from fastmae.config import PretrainConfig  # noqa: E402
from fastmae.data import build_video_loader, demo_cache_dir  # noqa: E402
from fastmae.data.video import decode_dali, decode_pyav, scan_videos  # noqa: E402
from fastmae.data.video_demo import encode_video, prepare_video_demo  # noqa: E402
from fastmae.methods import get_method  # noqa: E402

SIZE, SHIFT, T = 64, 3, 24


def _pan_frames() -> np.ndarray:
    """A pan over scikit-image's astronaut: frame f is the window at column 150 + SHIFT*f."""
    from skimage import data

    img = data.astronaut()
    return np.stack([img[80:80 + SIZE, 150 + SHIFT * f:150 + SHIFT * f + SIZE] for f in range(T)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _which_frame(frame: np.ndarray, src: np.ndarray) -> int:
    return int(np.argmin([np.abs(frame.astype(np.int32) - s).mean() for s in src]))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    src = _pan_frames()
    (root / "pan").mkdir()
    encode_video(root / "pan" / "a.webm", src, "vp9")
    encode_video(root / "pan" / "b.avi", src, "mjpeg")
    return root, src


def test_pyav_decodes_the_pan(clips):
    root, src = clips
    for name in ("a.webm", "b.avi"):
        idx = [0, 5, 7, 23, 5]
        frames = decode_pyav(str(root / "pan" / name), idx)
        assert frames.shape == (5, SIZE, SIZE, 3) and frames.dtype == np.uint8
        for f, i in zip(frames, idx, strict=True):
            assert _psnr(f, src[i]) > 26  # lossy 4:2:0 video of a detailed photo
            assert _which_frame(f, src) == i


def test_dali_cpu_decoder_matches_content_and_pyav(clips):
    root, src = clips
    for name in ("a.webm", "b.avi"):
        frames = decode_dali(str(root / "pan" / name), start=3, num_frames=4, stride=4)
        assert frames.shape == (4, SIZE, SIZE, 3)
        for k, f in enumerate(frames):
            assert _which_frame(f, src) == 3 + 4 * k
            assert _psnr(f, src[3 + 4 * k]) > 26
        ref = decode_pyav(str(root / "pan" / name), [3, 7, 11, 15])
        # Two decoders of the same stream differ only in YUV -> RGB rounding.
        assert np.abs(frames.astype(np.int32) - ref).mean() < 3


@pytest.mark.parametrize("decoder", ["torch", "dali"])
def test_eval_clip_is_the_central_span(clips, decoder):
    root, src = clips
    items, bad, classes = scan_videos(root, span=13, decoder=decoder)
    assert len(items) == 2 and not bad and {it.num_frames for it in items} == {T} and classes == ["pan"]
    kw = dict(split="train", batch_size=2, img_size=SIZE, num_frames=4, frame_stride=4, train=False, loader=decoder,
              num_workers=1)
    ld = build_video_loader(root, output="uint8", **kw)
    (clip_batch, labels), = list(ld)
    assert clip_batch.shape == (2, 4, SIZE, SIZE, 3) and clip_batch.dtype == torch.uint8
    start = (T - 13) // 2
    for clip in clip_batch.numpy():
        assert [_which_frame(f, src) for f in clip] == [start + 4 * k for k in range(4)]
    (flt, _), = list(build_video_loader(root, output="float", **kw))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = ((clip_batch.float() - mean * 255) * (1 / (std * 255))).permute(0, 4, 1, 2, 3)
    assert flt.shape == (2, 3, 4, SIZE, SIZE) and torch.equal(flt, want)


def test_train_sampling_is_seeded_and_resumes_exactly(tmp_path, clips):
    root, src = clips
    for k in range(3):  # six clips -> three batches of two
        (tmp_path / "c").mkdir(exist_ok=True)
        encode_video(tmp_path / "c" / f"{k}a.webm", src, "vp9")
        encode_video(tmp_path / "c" / f"{k}b.avi", src, "mjpeg")
    mk = lambda workers=0: build_video_loader(tmp_path, split="train", batch_size=2, img_size=32, num_frames=4,
                                              frame_stride=2, seed=5, output="uint8", num_workers=workers)
    ld = mk()
    ld.set_epoch(1)
    full = [b[0] for b in ld]
    assert len(full) == ld.steps_per_epoch == 3
    assert not torch.equal(full[0], full[1])
    ld2 = mk()
    ld2.set_epoch(1)
    it = iter(ld2)
    first = next(it)[0]
    state = ld2.state_dict()
    assert state["epoch"] == 1 and state["step"] == 1
    ld3 = mk()
    ld3.load_state_dict(state)
    rest = [b[0] for b in ld3]
    assert torch.equal(first, full[0]) and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(rest, full[1:], strict=True))
    # An exhausted loader rolls over to the next epoch, also right after resuming at an epoch's end.
    assert ld.state_dict()["step"] == 3
    ld4 = mk()
    ld4.load_state_dict(ld.state_dict())
    nxt = [b[0] for b in ld4]
    assert ld4.state_dict()["epoch"] == 2 and len(nxt) == 3
    ld.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(nxt, [b[0] for b in ld], strict=True))
    assert not torch.equal(nxt[0], full[0])
    # Worker processes decode the same batches in the same order.
    ldw = mk(workers=2)
    ldw.set_epoch(1)
    assert all(torch.equal(a, b[0]) for a, b in zip(full, ldw, strict=True)) and ldw.state_dict()["step"] == 3


def test_bad_clips_are_skipped_with_reasons(tmp_path, clips):
    _, src = clips
    (tmp_path / "c").mkdir()
    encode_video(tmp_path / "c" / "ok.webm", src, "vp9")
    encode_video(tmp_path / "c" / "short.webm", src[:5], "vp9")
    encode_video(tmp_path / "c" / "h264.mp4", src, "h264")
    (tmp_path / "c" / "garbage.webm").write_bytes(b"\x1aE\xdf\xa3 not a real matroska file" * 10)
    items, bad, _ = scan_videos(tmp_path, span=13, decoder="dali")
    assert [it.path.rsplit("/", 1)[1] for it in items] == ["ok.webm"]
    reasons = {p.rsplit("/", 1)[1]: r for p, r in bad}
    assert set(reasons) == {"short.webm", "h264.mp4", "garbage.webm"}
    assert "shorter than the sampled span of 13" in reasons["short.webm"]
    assert "codec h264 cannot be decoded by DALI on the CPU" in reasons["h264.mp4"]
    assert "cannot open" in reasons["garbage.webm"]
    items_t, bad_t, _ = scan_videos(tmp_path, span=13, decoder="torch")  # PyAV decodes H.264 on the CPU
    assert len(items_t) == 2 and len(bad_t) == 2
    cfg = PretrainConfig.from_flat(method="videomae", data=str(tmp_path), loader="torch", batch_size=1, img_size=32, seed=0,
                                num_workers=0, num_frames=4, frame_stride=8, tubelet_size=2)
    build_loader = get_method("videomae").build_loader
    with pytest.raises(ValueError, match="no usable clip of 25 frames"):
        build_loader(cfg, 0, 1, "cpu", "train", "float")
    cfg.method.num_frames, cfg.method.frame_stride = 5, 1
    with pytest.raises(ValueError, match="not divisible by the tubelet size"):
        build_loader(cfg, 0, 1, "cpu", "train", "float")
    # A clip that passes the scan but fails to decode is substituted by the next one and reported once.
    d = tmp_path / "rt" / "c"
    d.mkdir(parents=True)
    encode_video(d / "a.webm", src, "vp9")
    for loader in ("torch", "dali"):
        encode_video(d / "b.webm", src, "vp9")
        ld = build_video_loader(tmp_path / "rt", split="train", batch_size=2, img_size=16, num_frames=4, frame_stride=4,
                                train=False, shuffle=False, loader=loader, output="uint8", num_workers=0)
        assert ld.num_samples == 2 and ld.bad_count == 0
        (d / "b.webm").write_bytes(b"\x1aE\xdf\xa3 gone bad after the scan" * 10)
        (x, y), = list(ld)
        assert torch.equal(x[0], x[1]) and [p.rsplit("/", 1)[1] for p, _ in ld.bad_files] == ["b.webm"]
        assert ld.bad_count == 1 and ld.substitutions == 1


def test_demo_set_and_method_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path))
    assert demo_cache_dir() == tmp_path
    root = prepare_video_demo(tmp_path, clips_per_class=(1, 1), n_frames=64, size=48)
    assert (root / "DONE").exists() and len(list((root / "train").rglob("*.webm"))) == 6
    assert prepare_video_demo(tmp_path) == root  # cached: nothing rebuilt
    ld = build_video_loader("demo", split="train", batch_size=3, img_size=32, num_frames=16, frame_stride=4,
                            num_workers=0)
    assert ld.steps_per_epoch == 2 and not ld.bad_files and ld.num_classes == 6
    ld.set_epoch(0)
    clips_, labels = next(iter(ld))
    assert clips_.shape == (3, 3, 16, 32, 32) and clips_.dtype == torch.float32 and labels.shape == (3,)
    cfg = PretrainConfig.from_flat(method="videomae", data="demo", loader="torch", batch_size=3, img_size=32, seed=0,
                                num_workers=0, num_frames=16, frame_stride=4, tubelet_size=0)
    assert get_method("videomae").build_loader(cfg, 0, 1, "cpu", "val", "uint8").steps_per_epoch == 2  # 6 val clips


def test_synthetic_clips():
    ld = build_video_loader(None, split="train", batch_size=2, img_size=16, num_frames=4, frame_stride=2,
                            loader="synthetic", num_samples=6)
    x, y = next(iter(ld))
    assert x.shape == (2, 3, 4, 16, 16) and x.dtype == torch.float32 and len(ld) == 3 and y.dtype == torch.int64
    u = build_video_loader(None, split="train", batch_size=2, img_size=16, num_frames=4, frame_stride=2,
                           loader="synthetic", output="uint8")
    assert next(iter(u))[0].shape == (2, 4, 16, 16, 3)


def test_evaluate_on_clips(clips):
    from fastmae.methods.videomae import VideoMAE

    root, _ = clips
    ld = build_video_loader(root, split="train", batch_size=2, img_size=32, num_frames=4, frame_stride=1, train=False,
                            output="uint8", num_workers=0)
    model = VideoMAE(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2)
    evaluate = get_method("videomae").evaluate
    out = evaluate(model, ld, torch.device("cpu"), 0.75)
    assert out["count"] == 2 and out["loss"] > 0 and out["unit"] == "clips"
    assert evaluate(model, ld, torch.device("cpu"), 0.75) == out


def test_skipped_clips_are_logged_with_escaped_names(tmp_path, clips, caplog):
    import logging

    _, src = clips
    (tmp_path / "c").mkdir()
    encode_video(tmp_path / "c" / "ok.webm", src, "vp9")
    (tmp_path / "c" / "\x1b[2Jevil.webm").write_bytes(b"not a clip" * 10)
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        ld = build_video_loader(tmp_path, split="train", batch_size=1, img_size=16, num_frames=2, frame_stride=1,
                                num_workers=0)
    assert ld.bad_count == 1 and ld.bad_files[0][0].endswith("\x1b[2Jevil.webm")
    assert "skipping 1 clip(s)" in caplog.text and "\x1b" not in caplog.text and "\\x1b[2Jevil.webm" in caplog.text
