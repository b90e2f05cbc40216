"""The training step as a function: equal to a hand-written eager step, accumulation, non-finite skips, log windows."""

from __future__ import annotations

import copy

import pytest
import torch

from fastmae.engine.optim import build_adamw
from fastmae.engine.step import LogWindow, StepStats, TrainingAborted, train_step
from fastmae.models import mae_vit_tiny


def _model():
    torch.manual_seed(0)
    return mae_vit_tiny(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def _data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, 16, generator=g)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
def test_step_equals_a_hand_written_eager_step_bit_for_bit(clip_grad):
    ours, ref = _model(), _model()
    lr = 1e-3
    opt = build_adamw(ours, torch.tensor(lr), 0.05, (0.9, 0.95), torch.device("cpu"))
    ref_opt = build_adamw(ref, torch.tensor(lr), 0.05, (0.9, 0.95), torch.device("cpu"))
    stats = StepStats.zeros("cpu")
    for step in range(3):
        x, noise = _data(4, seed=step)
        loss, bad = train_step(lambda b, mask_ratio, noise=noise: ours(b, mask_ratio, noise), opt, _params(ours),
                               lambda x=x: x, mask_ratio=0.75, clip_grad=clip_grad, stats=stats)
        # The step the papers' code runs, written out.
        ref_loss = ref(x, 0.75, noise)[0]
        ref_loss.backward()
        grads = [p.grad for p in _params(ref)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(_params(ref), clip_grad)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert torch.equal(loss, ref_loss.detach()) and bad.item() == 0.0
        torch.testing.assert_close(stats.grad_norm, norm, rtol=1e-6, atol=0)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in ours.parameters())
    assert stats.good.item() == 3 and stats.bad_total.item() == 0


def test_two_micro_batches_equal_one_batch():
    # SGD with lr 1 makes the update the gradient itself, so the accumulated gradient is compared directly
    # (fused: like fused AdamW it honours found_inf).
    full, accum = _model(), _model()
    x, noise = _data(8)
    opt_full = torch.optim.SGD(full.parameters(), lr=1.0, fused=True)
    opt_accum = torch.optim.SGD(accum.parameters(), lr=1.0, fused=True)
    loss_full, _ = train_step(lambda b, mask_ratio: full(b, mask_ratio, noise), opt_full, _params(full), lambda: x,
                              mask_ratio=0.75)
    halves = iter([(x[:4], noise[:4]), (x[4:], noise[4:])])
    current = {}

    def next_half():
        current["x"], current["noise"] = next(halves)
        return current["x"]

    loss_accum, _ = train_step(lambda b, mask_ratio: accum(b, mask_ratio, current["noise"]), opt_accum, _params(accum),
                               next_half, accum_iter=2, mask_ratio=0.75)
    torch.testing.assert_close(loss_accum, loss_full, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(full.state_dict().items(), accum.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    moved = full.state_dict()["blocks.0.mlp.fc1.weight"] - _model().state_dict()["blocks.0.mlp.fc1.weight"]
    assert moved.abs().max() > 0


def test_nonfinite_loss_skips_the_update_and_counts():
    model = _model()
    opt = build_adamw(model, torch.tensor(1e-2), 0.05, (0.9, 0.95), torch.device("cpu"))
    x, noise = _data(4)
    stats = StepStats.zeros("cpu")
    before = copy.deepcopy(model.state_dict())
    poisoned = lambda b, mask_ratio: (model(b, mask_ratio, noise)[0] * float("nan"),)
    for _ in range(2):
        loss, bad = train_step(poisoned, opt, _params(model), lambda: x, mask_ratio=0.75, stats=stats)
        assert bad.item() == 1.0 and torch.isnan(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    assert (stats.bad_total.item(), stats.bad_run.item(), stats.good.item(), stats.loss_sum.item()) == (2, 2, 0, 0)
    train_step(lambda b, mask_ratio: model(b, mask_ratio, noise), opt, _params(model), lambda: x, mask_ratio=0.75,
               stats=stats)
    assert (stats.bad_total.item(), stats.bad_run.item(), stats.good.item()) == (2, 0, 1)
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_log_window_reads_the_mean_loss_of_good_steps_and_aborts_on_a_bad_run():
    stats = StepStats.zeros("cpu")
    window = LogWindow(samples_per_step=8, start_step=0, steps_per_epoch=4, flops_per_sample=10.0, peak_flops=1e3)
    for loss, bad in ((1.0, 0.0), (3.0, 0.0), (float("nan"), 1.0)):
        stats.update(torch.tensor(loss), torch.tensor(bad), torch.tensor(2.0))
        window.tick()
    row = window.close(3, stats, torch.tensor(0.5))
    assert row["loss"] == 2.0 and row["lr"] == 0.5 and row["grad_norm"] == 2.0 and row["skipped"] == 1
    assert row["epoch"] == 0.75 and row["mfu"] == pytest.approx(row["img_s"] * 10.0 / 1e3)
    assert stats.loss_sum.item() == 0 and stats.good.item() == 0  # the window restarts
    window.check_bad_run(2)
    with pytest.raises(TrainingAborted, match="1 consecutive steps"):
        window.check_bad_run(1)


class _GradProbe(torch.optim.SGD):
    """Fused SGD that records, at step time, whether any gradient was rewritten since backward accumulated it."""

    def __init__(self, params):
        params = list(params)
        super().__init__(params, lr=0.0, fused=True)
        self.after_backward, self.rewritten = {}, None
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: self.after_backward.__setitem__(p, _grad_version(p)))

    def step(self, closure=None):
        self.rewritten = [p for p, v in self.after_backward.items() if _grad_version(p) != v]
        return super().step(closure)


def _grad_version(p):
    return p.grad.data_ptr(), p.grad._version


@pytest.mark.parametrize("clip_grad,rewritten", [(0.0, False), (1e-3, True)])
def test_no_clipping_only_reads_the_gradients(clip_grad, rewritten):
    # clip_grad_norm_(params, inf) would multiply every gradient by 1.0: a full read-write pass for nothing.
    model = _model()
    x, noise = _data(4)
    probe = _GradProbe(_params(model))
    _, bad = train_step(lambda b, mask_ratio: model(b, mask_ratio, noise), probe, _params(model), lambda: x,
                        mask_ratio=0.75, clip_grad=clip_grad)
    assert bad.item() == 0 and len(probe.after_backward) == len(_params(model))
    assert bool(probe.rewritten) is rewritten
