"""Evaluation protocols plug in through a registry (issue 23, item 2); k-NN against scikit-learn's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastmae.eval.protocols import get_protocol, list_protocols, protocol_for
from fastmae.eval.protocols.knn import knn_scores


def test_every_protocol_is_registered_and_tune_blocks_selects_one():
    assert {"linprobe", "partial", "finetune", "finetune-video", "knn"} <= set(list_protocols())
    assert [protocol_for(k).name for k in (0, 1, 3, -1)] == ["linprobe", "partial", "partial", "finetune"]
    assert get_protocol("knn").frozen and get_protocol("linprobe").frozen and not get_protocol("finetune").frozen
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        get_protocol("nope")


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_vote_matches_scikit_learn(k, temperature):
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    train_y = torch.randint(0, 7, (300,), generator=g)
    # cosine distance d = 1 - s, so DINO's weight exp(s / T) is exp((1 - d) / T)
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / temperature))
    ref.fit(train_f.numpy(), train_y.numpy())
    ours = knn_scores(train_f, train_y, test_f, 7, k=k, temperature=temperature, chunk=17)
    np.testing.assert_array_equal(ours.argmax(1).numpy(), ref.predict(test_f.numpy()))
    np.testing.assert_allclose((ours / ours.sum(1, keepdim=True)).numpy(), ref.predict_proba(test_f.numpy()),
                               rtol=1e-4, atol=1e-6)


def test_knn_command_scores_a_frozen_encoder(tmp_path, capsys):
    from fastmae.eval.protocols import knn

    out = tmp_path / "knn"
    rc = knn.main(["--ckpt=random", "--embed_dim=32", "--depth=2", "--num_heads=2", f"--output_dir={out}",
                   "--knn_k=10"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "knn" and res["n_val"] == 449 and res["n_train"] == 1348
    assert res["top1"] > 2 * res["chance"]  # raw pixels through a random ViT already cluster digits
    assert "knn top-1" in capsys.readouterr().out
    assert knn.main(["--knn_temperature=0", f"--output_dir={tmp_path / 'x'}"]) == 2


def test_linprobe_trains_on_features_computed_once(tmp_path, monkeypatch):
    from fastmae.eval import linprobe, protocol

    calls = []
    real = protocol.encode
    monkeypatch.setattr(protocol, "encode", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    forwards = []
    real_fwd = protocol.Classifier.forward
    monkeypatch.setattr(protocol.Classifier, "forward", lambda self, x: forwards.append(1) or real_fwd(self, x))
    assert linprobe.main(["--ckpt=random", "--embed_dim=32", "--depth=2", "--num_heads=2", "--epochs=3",
                          f"--output_dir={tmp_path}", "--quiet=true"]) == 0
    assert sorted(calls) == [449, 1348] and not forwards  # train and test split once; the encoder never again
