"""Online evaluation during pretraining: k-NN top-1 of the encoder's frozen features on a labelled split.

``fastmae pretrain --monitor=knn --monitor_every=N`` scores the encoder every N optimizer steps between two
steps (never inside one): the cls feature of every image of a small labelled split (the embedded digits by
default), cosine similarity to the training images' features, and the temperature-weighted vote DINO
popularised (weight ``exp(s / T)`` for each of the k nearest, k = 20, T = 0.07). The one host sync is the
score itself, once per monitor window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def knn_scores(train_f: Tensor, train_y: Tensor, test_f: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(N_test, num_classes) summed vote weights of each test feature's k nearest training features."""
    train_f = F.normalize(train_f.float(), dim=1)
    k = min(k, len(train_f))
    out = []
    for q in F.normalize(test_f.float(), dim=1).split(chunk):
        sim, idx = (q @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else test_f.new_zeros(0, num_classes)


class KnnMonitor:
    """k-NN top-1 of ``model.forward_features(x)[:, 0]`` (the cls token) on in-memory labelled splits."""

    def __init__(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 every: int, k: int = 20, temperature: float = 0.07, batch_size: int = 256):
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.num_classes, self.every, self.k, self.temperature = num_classes, every, k, temperature
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, model: nn.Module, x: Tensor, amp_dtype: torch.dtype) -> Tensor:
        out = []
        for batch in x.split(self.batch_size):
            with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                out.append(model.forward_features(batch)[:, 0].float())
        return torch.cat(out)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def score(self, model: nn.Module, amp_dtype: torch.dtype) -> dict:
        """{"knn_top1": ...} of ``model`` now; leaves its train/eval mode as it was."""
        was_training = model.training
        model.eval()
        try:
            scores = knn_scores(self.features(model, self.train_x, amp_dtype), self.train_y,
                                self.features(model, self.test_x, amp_dtype), self.num_classes, self.k,
                                self.temperature)
        finally:
            model.train(was_training)
        # Deliberate sync, once per monitor window: the score goes into the log row.
        return {"knn_top1": (scores.argmax(1) == self.test_y).float().mean().item()}
