"""The score-function plugins backpropagate their loss step by step: the same gradient as the whole loss, with
one step's graph alive at a time (counted in bytes the autograd graph saves, not assumed)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora

from ctrl.algorithms import PPO, RAFT, ContinuousTimePG
from ctrl.policy import UNetPolicy
from ctrl.sampling import sample

STEPS = 8
PLUGINS = {
    "PPO": lambda: PPO(alpha=0.5, clip_range=0.5),
    "ContinuousTimePG": lambda: ContinuousTimePG(alpha=0.5, clip_range=0.5),
    "RAFT top": lambda: RAFT(alpha=0.5, keep_fraction=0.5, per_condition=False),
    "RAFT tilted": lambda: RAFT(alpha=0.5, selection="tilted"),
}


def reward(x0, labels):
    return -x0.flatten(1).square().mean(1) + labels.float()


class SavedBytes:
    """Bytes the autograd graph holds for backward, now and at most, while the context is open."""

    def __init__(self):
        self.now = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def _pack(self, tensor):
        counter = self

        class Held:  # freed with the graph that saved it
            def __init__(self):
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                counter.now += self.size
                counter.peak = max(counter.peak, counter.now)

            def __del__(self):
                counter.now -= self.size

        return Held()

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _batch(name, tiny_pretrained):
    torch.manual_seed(0)
    policy = UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    randomize_lora(policy)
    algorithm = PLUGINS[name]()
    algorithm.setup(policy, None)
    trajectory = sample(policy, torch.tensor([0, 1, 0, 1]), STEPS, 1.0, generator=torch.Generator().manual_seed(1))
    [batch] = list(algorithm.updates(trajectory, policy, reward))
    return policy, algorithm, batch


def _gradients(policy, algorithm) -> list[torch.Tensor]:
    params = [p for g in policy.param_groups() + algorithm.param_groups() for p in g["params"]]
    assert all(p.grad is not None for p in params)  # the loss reached every trainable parameter
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("name", PLUGINS)
def test_stepwise_backward_gives_the_whole_loss_gradient_with_one_step_alive(name, tiny_pretrained):
    policy, algorithm, batch = _batch(name, tiny_pretrained)
    assert len(batch.steps) == STEPS - 1  # the tiny model's grid ends with a deterministic step

    torch.manual_seed(2)  # RAFT "top" draws the forward-process noise of each step
    with SavedBytes() as whole:
        out = algorithm.loss(batch, policy, reward)
        out["loss"].backward()
    expected = _gradients(policy, algorithm)

    torch.manual_seed(2)
    with SavedBytes() as stepwise:
        parts = []
        stats = algorithm.backward_loss(batch, policy, reward, lambda t: (parts.append(t.detach()), t.backward()))
    got = _gradients(policy, algorithm)

    assert len(parts) == len(batch.steps)
    for g, e in zip(got, expected):  # equal up to float32 summation order
        torch.testing.assert_close(g, e, atol=1e-5 * float(e.abs().max()), rtol=1e-4)
    torch.testing.assert_close(stats["loss"], out["loss"].detach(), atol=1e-6, rtol=1e-5)
    assert set(stats) == set(out)
    # one step's graph at a time: the peak is about a step's share of the whole loss's
    assert stepwise.peak < 1.5 * whole.peak / len(batch.steps), (stepwise.peak, whole.peak)


@pytest.mark.parametrize("name", PLUGINS)
def test_steps_evaluated_together_give_the_same_update(name, tiny_pretrained):
    """``steps_per_call`` G: the stored steps go through the network G at a time (one call, one backward per
    group); the gradient and statistics are those of one step per call, and G steps' graphs are alive."""
    policy, algorithm, batch = _batch(name, tiny_pretrained)
    results = {}
    for per_call in (1, 3):
        algorithm.steps_per_call = per_call
        torch.manual_seed(2)
        parts = []

        def backward(term, parts=parts):
            parts.append(term)
            term.backward()

        with SavedBytes() as saved:
            stats = algorithm.backward_loss(batch, policy, reward, backward)
        results[per_call] = _gradients(policy, algorithm), stats, len(parts), saved.peak
    (expected, out, n_one, peak_one), (got, stats, n_three, peak_three) = results[1], results[3]
    assert (n_one, n_three) == (STEPS - 1, 3)  # 7 steps: groups of 3, 3 and 1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5 * float(e.abs().max()), rtol=1e-4)
    for key in out:
        torch.testing.assert_close(stats[key], out[key], atol=1e-6, rtol=1e-5)
    assert 2 * peak_one < peak_three <= 3.5 * peak_one, (peak_one, peak_three)
