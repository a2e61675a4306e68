"""No network call that nothing uses: counted, not assumed. At alpha = 0 a rollout skips the pretrained model;
an update re-evaluating stored steps calls only the policy (the rollout's pretrained means are reused); the
KL can still be computed afterwards, equal to the one the sampler gives."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora

from ctrl.algorithms import PPO, RAFT
from ctrl.policy import StableDiffusionPolicy, UNetPolicy
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import chain_kl, sample

STEPS = 4


class Counter:
    """Counts forward calls of a module (one batched call counts once)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _rollout(policy, pretrained: bool, labels=None):
    labels = torch.tensor([0, 1]) if labels is None else labels
    return sample(policy, labels, STEPS, 1.0, generator=torch.Generator().manual_seed(0), pretrained=pretrained)


@pytest.fixture
def sd_policy(tiny_sd):
    policy = StableDiffusionPolicy(tiny_sd, prompts=["a cat", "a dog"], lora_rank=2)
    randomize_lora(policy.unet)
    return policy


def test_a_rollout_without_the_pretrained_model_makes_half_the_calls(sd_policy):
    counter = Counter(sd_policy.unet)
    full = _rollout(sd_policy, pretrained=True)
    with_pretrained, counter.calls = counter.calls, 0
    lean = _rollout(sd_policy, pretrained=False)
    assert (with_pretrained, counter.calls) == (2 * STEPS, STEPS)  # SD's grid: every step has noise
    torch.testing.assert_close(lean.latents, full.latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lean.log_probs, full.log_probs, atol=1e-3, rtol=1e-4)
    assert lean.kl is None and lean.ref_log_probs is None and lean.pre_means is None
    # the KL computed afterwards, without gradients, is the sampler's
    torch.testing.assert_close(chain_kl(sd_policy, lean), full.kl, atol=1e-4, rtol=1e-3)


def test_the_null_label_still_needs_the_pretrained_model(sd_policy):
    counter = Counter(sd_policy.unet)
    _rollout(sd_policy, pretrained=False, labels=torch.tensor([0, sd_policy.null_label]))
    assert counter.calls == 2 * STEPS


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ppo_updates_call_only_the_policy(alpha, sd_policy):
    algorithm = PPO(alpha=alpha, minibatch_size=2)
    algorithm.setup(sd_policy, None)
    trajectory = _rollout(sd_policy, pretrained=algorithm.needs_pretrained)
    assert (trajectory.pre_means is not None) == (alpha > 0)
    rewards = torch.tensor([1.0, -1.0])
    [batch] = list(algorithm._minibatches(trajectory, rewards, **algorithm.per_chain(trajectory, rewards, None, None)))
    counter = Counter(sd_policy.unet)
    out = algorithm.loss(batch, sd_policy, None)
    assert counter.calls == len(batch.steps) == STEPS
    assert ("kl" in out) == (alpha > 0)
    out["loss"].backward()


def test_tilted_raft_reuses_the_rollout_pretrained_means(tiny_pretrained):
    policy = UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    algorithm = RAFT(alpha=0.5, selection="tilted")
    algorithm.setup(policy, GaussianLogLikelihood(y=[0.0]))
    trajectory = _rollout(policy, pretrained=True)
    [batch] = list(algorithm.updates(trajectory, policy, lambda x0, labels: -x0.flatten(1).square().mean(1)))
    counter = Counter(policy.unet)
    algorithm.loss(batch, policy, None)
    assert counter.calls == len(batch.steps)
