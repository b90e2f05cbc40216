"""DALI loader tests on the CPU pipeline (device_id=None): semantics vs the torch loader, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from test_data_helpers import write_bad_folder, write_folder, write_tars

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, build_loader

IMG = 32


def _collect(loader, n=None):
    out = []
    for k, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n is not None and k + 1 == n:
            break
    return out


dali = pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("dfolder"), per_class=10)


@pytest.mark.parametrize("train", [True, False])
def test_dali_matches_torch_semantics(folder, train):
    """Same layout, dtype, normalization, sample order and crop windows; pixels differ only by the
    decoders' / resamplers' rounding (the crops are identical by construction)."""
    kw = dict(batch_size=8, img_size=IMG, train=train, num_workers=2, seed=4)
    d8 = _collect(build_loader(folder, loader="dali", output="uint8", **kw))
    t8 = _collect(build_loader(folder, loader="torch", output="uint8", **kw))
    df = _collect(build_loader(folder, loader="dali", output="float", **kw))
    assert len(d8) == len(t8) == 3
    mean = torch.tensor(IMAGENET_MEAN) * 255
    inv = 1 / (torch.tensor(IMAGENET_STD) * 255)
    for (xd, yd), (xt, yt), (xf, _) in zip(d8, t8, df, strict=True):
        assert xd.shape == xt.shape == (8, IMG, IMG, 3) and xd.dtype == torch.uint8
        assert yd.dtype == torch.int64 and torch.equal(yd, yt)
        assert xf.shape == (8, 3, IMG, IMG) and xf.dtype == torch.float32
        torch.testing.assert_close(xf, ((xd.float() - mean) * inv).permute(0, 3, 1, 2), rtol=0, atol=1e-6)
        diff = (xd.float() - xt.float()).abs()
        assert diff.mean() < 1.5, diff.mean()
        assert diff.flatten(1).mean(1).max() < 4.0


def test_dali_resume_equivalence(folder, tmp_path):
    kw = dict(loader="dali", batch_size=4, img_size=IMG, output="uint8", seed=9, num_workers=2)
    ref = build_loader(folder, **kw)
    ref.set_epoch(3)
    full = _collect(ref)
    ld = build_loader(folder, **kw)
    ld.set_epoch(3)
    head = _collect(ld, n=4)
    torch.save(ld.state_dict(), tmp_path / "s.pt")
    new = build_loader(folder, **{**kw, "num_workers": 1})
    new.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    tail = _collect(new)
    assert len(head) + len(tail) == len(full) == 7
    for (x1, y1), (x2, y2) in zip(full, head + tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_dali_bad_files_run_to_the_end(tmp_path):
    write_bad_folder(tmp_path / "bad")
    kw = dict(batch_size=4, img_size=IMG, output="uint8", num_workers=2, seed=1)
    ld = build_loader(tmp_path / "bad", loader="dali", **kw)
    tl = build_loader(tmp_path / "bad", loader="torch", **kw)
    for epoch in range(2):
        ld.set_epoch(epoch)
        tl.set_epoch(epoch)
        d, t = _collect(ld), _collect(tl)
        assert len(d) == ld.steps_per_epoch
        for (xd, yd), (xt, yt) in zip(d, t, strict=True):
            assert torch.equal(yd, yt)  # same substitution rule as the torch loader
            assert (xd.float() - xt.float()).abs().mean() < 3.0
    assert [p.split("/")[-1] for p, _ in ld.bad_files][-1] == "corrupt.png"
    assert [p for p, _ in ld.bad_files] == [p for p, _ in tl.bad_files]


def test_dali_webdataset_shards(folder, tmp_path):
    write_tars(folder, tmp_path / "sh", shards=2)
    kw = dict(loader="dali", batch_size=8, img_size=IMG, output="uint8", seed=2, world_size=2, rank=1)
    lt = build_loader(str(tmp_path / "sh" / "train-{000000..000001}.tar"), **kw)
    lf = build_loader(folder, **kw)
    bt, bf = _collect(lt), _collect(lf)
    assert len(bt) == lt.steps_per_epoch == 1
    for (xt, yt), (xf, yf) in zip(bt, bf, strict=True):
        assert torch.equal(xt, xf) and torch.equal(yt, yf)


def test_dali_partial_last_batch_eval(folder):
    kw = dict(batch_size=8, img_size=IMG, output="uint8", train=False, drop_last=False, num_workers=1)
    d = _collect(build_loader(folder, loader="dali", **kw))
    t = _collect(build_loader(folder, loader="torch", **kw))
    assert [len(y) for _, y in d] == [len(y) for _, y in t] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([y for _, y in d]), torch.cat([y for _, y in t]))


def test_one_pipeline_for_many_epochs(folder):
    """Three epochs through one pipeline: each epoch equals a freshly built loader's run of that epoch
    (nothing leaks across the boundary DALI prefetches over) and tracks the torch loader's crops."""
    kw = dict(batch_size=8, img_size=IMG, output="uint8", seed=6, num_workers=1)
    ld = build_loader(folder, loader="dali", **kw)
    tl = build_loader(folder, loader="torch", **{**kw, "num_workers": 0})
    for epoch in range(3):
        got = _collect(ld)  # a bare loop: each exhausted epoch rolls over to the next
        assert ld.epoch == epoch and len(got) == 3
        fresh = build_loader(folder, loader="dali", **kw)
        fresh.set_epoch(epoch)
        tl.set_epoch(epoch)
        for (x, y), (xf, yf), (xt, yt) in zip(got, _collect(fresh), _collect(tl), strict=True):
            assert torch.equal(x, xf) and torch.equal(y, yf) and torch.equal(y, yt)
            assert (x.float() - xt.float()).abs().mean() < 1.5
    assert ld.builds == 1


def test_jumps_and_resume_on_a_live_pipeline(folder):
    """Abandoned epochs, set_epoch jumps and load_state_dict on a loader whose pipeline holds prefetched
    batches: the stale batches are drained, the results stay exact, and nothing is rebuilt."""
    kw = dict(loader="dali", batch_size=4, img_size=IMG, output="uint8", seed=2, num_workers=1)
    ref = {}
    for epoch in (0, 1, 5):
        r = build_loader(folder, **kw)
        r.set_epoch(epoch)
        ref[epoch] = _collect(r)
    ld = build_loader(folder, **kw)
    _collect(ld, n=2)  # abandon epoch 0 after two batches
    ld.set_epoch(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_collect(ld), ref[5], strict=True))
    ld.load_state_dict({"epoch": 1, "step": 3})  # back to the middle of epoch 1
    tail = _collect(ld)
    assert len(tail) == len(ref[1]) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, ref[1][3:], strict=True))
    assert ld.builds == 1


def test_mixed_decoder_gets_the_preallocation_hints():
    from nvidia.dali import backend

    from fastmae.data.dali import decoder_kwargs

    mixed, cpu = decoder_kwargs(True, 0.5), decoder_kwargs(False, 0.5)
    assert cpu == {"device": "cpu"}
    assert mixed["device"] == "mixed" and mixed["hw_decoder_load"] == 0.5
    assert mixed["preallocate_width_hint"] == 5980 and mixed["preallocate_height_hint"] == 6430
    assert mixed["device_memory_padding"] > 0 and mixed["host_memory_padding"] > 0
    for op in ("decoders__ImageSlice", "decoders__Image"):
        schema = backend.GetSchema(op)
        assert all(schema.HasArgument(k) for k in mixed if k != "device")


def test_file_names_that_are_not_utf8(tmp_path):
    import os

    root = write_folder(tmp_path / "d", per_class=2)
    src = root / "class0" / "000.jpg"
    odd = os.path.join(os.fsencode(root / "class0"), b"caf\xe9-\x1b.jpg")
    with open(odd, "wb") as f:
        f.write(src.read_bytes())
    kw = dict(batch_size=7, img_size=IMG, output="uint8", train=False, num_workers=1)
    d, t = _collect(build_loader(root, loader="dali", **kw)), _collect(build_loader(root, **kw))
    assert len(d) == len(t) == 1 and torch.equal(d[0][1], t[0][1])
    assert (d[0][0].float() - t[0][0].float()).abs().mean() < 1.5


def _planted(demo_dir, out):
    """Demo photos plus what passes the scan but not the torch loader: a JPEG with spliced image data, one with
    a bogus Huffman table, a 10k x 10k PNG (a decompression bomb), a 3 GB sparse JPEG (past the 128 MiB read
    cap); and a 16-bit PNG ramp, which both must scale to 8 bits."""
    import shutil

    import numpy as np
    from PIL import Image

    out.mkdir(parents=True)
    jpgs = sorted(demo_dir.rglob("*.jpg"))[:19]
    for i, p in enumerate(jpgs):
        shutil.copy(p, out / f"img{i:02d}.jpg")
    good = jpgs[0].read_bytes()
    mid = len(good) // 2
    (out / "zz_spliced.jpg").write_bytes(good[:mid] + b"\xff\x00" * 40 + b"\xff\xd0\x12\xff\xc9" * 50 + good[mid + 300:])
    dht = bytearray(good)
    k = dht.find(b"\xff\xc4")
    dht[k + 5 : k + 21] = b"\xff" * 16
    (out / "zz_huffman.jpg").write_bytes(bytes(dht))
    Image.new("L", (10000, 10000)).save(out / "zz_bomb.png", compress_level=1)
    with (out / "zz_sparse.jpg").open("wb") as f:
        f.write(good)
        f.seek(3 << 30)
        f.write(b"\xff\xd9")
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(out / "ramp16.png")
    return {"zz_spliced.jpg", "zz_huffman.jpg", "zz_bomb.png", "zz_sparse.jpg"}


def test_dali_counts_and_names_every_substitution_like_the_torch_loader(demo_dir, tmp_path):
    from fastmae.data.sources import open_source

    planted = _planted(demo_dir, tmp_path / "d")
    src = open_source(tmp_path / "d")
    assert planted <= {n.split("/")[-1] for n in src.names}, "the scan must pass them for this test to mean anything"
    kw = dict(batch_size=8, img_size=IMG, output="uint8", seed=3, augment="eval", train=False)
    ld = build_loader(tmp_path / "d", loader="dali", num_workers=1, **kw)
    tl = build_loader(tmp_path / "d", loader="torch", num_workers=0, **kw)
    d, t = _collect(ld), _collect(tl)
    assert {p.split("/")[-1] for p, _ in ld.bad_files} == {p.split("/")[-1] for p, _ in tl.bad_files} == planted
    # every failed attempt counts: the four sort together, so zz_bomb's visit fails 4 times before a good file
    assert ld.substitutions == tl.substitutions == 4 + 3 + 2 + 1
    reasons, torch_reasons = ({p.split("/")[-1]: r for p, r in loader.bad_files} for loader in (ld, tl))
    assert "pixels is more than the limit" in reasons["zz_bomb.png"]
    for name in ("zz_bomb.png", "zz_sparse.jpg"):  # the same refusal, in the same words
        assert reasons[name] == torch_reasons[name]
    ramp = src.names.index(str(tmp_path / "d" / "ramp16.png"))
    for (xd, _), (xt, _) in zip(d, t, strict=True):
        assert (xd.float() - xt.float()).abs().mean() < 3.0
    row = ramp % 8 if ramp < len(d) * 8 else None
    if row is not None:  # the 16-bit ramp: scaled like the torch loader's (x >> 8), not clipped to white
        xd, xt = d[ramp // 8][0][row], t[ramp // 8][0][row]
        assert (xd == 255).float().mean() < 0.05 and (xd.float() - xt.float()).abs().mean() < 3.0


def test_whole_image_decode_crops_like_the_roi_decode_on_the_cpu_backend(folder):
    """``dali_decode="whole"`` runs the same graph on the CPU (device_id=None): the whole-image decode, then the
    window as an absolute resize ROI. Same labels and windows as the ROI decode; pixels differ only where the
    cubic kernel at the window's border reads real neighbours instead of the clamped edge."""
    kw = dict(loader="dali", batch_size=8, img_size=IMG, output="uint8", num_workers=1, seed=4)
    roi, whole = build_loader(folder, dali_decode="roi", **kw), build_loader(folder, **{**kw, "dali_decode": "whole"})
    assert whole.dali_decode == "whole" and roi.dali_decode == "roi"
    for (xr, yr), (xw, yw) in zip(_collect(roi), _collect(whole), strict=True):
        assert torch.equal(yr, yw)
        mse = (xr.float() - xw.float()).pow(2).mean().item()
        assert mse == 0 or 10 * torch.log10(torch.tensor(255.0**2 / mse)) >= 45, mse
    with pytest.raises(ValueError, match="dali_decode must be one of"):
        build_loader(folder, dali_decode="nvjpeg", **kw)


def test_dali_decode_key_is_checked():
    from fastmae.config import parse_overrides

    assert parse_overrides(["--loader=dali", "--dali_decode=whole"]).data.dali_decode == "whole"
    with pytest.raises(ValueError, match="dali_decode must be roi or whole"):
        parse_overrides(["--loader=dali", "--dali_decode=nvjpeg"])
    with pytest.raises(ValueError, match="dali_decode=whole needs loader=dali"):
        parse_overrides(["--dali_decode=whole"])  # the torch loader would silently ignore it


def _graph(node) -> list[tuple[str, str]]:
    """(operator schema, output device) of every operator upstream of ``node``, depth first."""
    op = node.source
    out = [(getattr(op._op, "schema_name", type(op._op).__name__), node.device)]
    for inp in op._inputs:
        out += _graph(inp)
    return out


@pytest.mark.parametrize("whole", [True, False])
def test_mixed_graphs_are_defined_for_both_decodes(whole):
    """No GPU here: the mixed graphs are defined (not built) and checked node by node: hardware-capable decode on
    'mixed' at the loader's hw_decoder_load, then crop + resize + flip on the GPU in one resize."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from fastmae.data.dali import decoder_kwargs, train_crop

    with Pipeline(batch_size=4, num_threads=1, device_id=None):
        enc, anchor, shape, start, end = (fn.external_source(name=n) for n in ("enc", "a", "s", "r0", "r1"))
        dec_kw = {"output_type": types.RGB, **decoder_kwargs(True, 0.65)}
        out = train_crop(fn, enc, anchor, shape, start, end, 224, whole, dec_kw, {"interp_type": types.INTERP_CUBIC})
    ops = _graph(out)
    assert ops[0] == ("Resize", "gpu")
    decoder = "decoders__Image" if whole else "decoders__ImageSlice"
    assert (decoder, "gpu") in ops and "hw_decoder_load: 0.65" in str(out.source._inputs[0].source._spec)
    assert str(out.source._spec).count("roi_relative: " + ("False" if whole else "True")) == 1
    assert ("decoders__ImageSlice" in dict(ops)) != whole
