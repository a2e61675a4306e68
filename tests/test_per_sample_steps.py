"""A policy's eps takes a timestep per sample (``t`` ``[B]``), as the minibatch algorithms use it to evaluate
several stored steps in one network call: each sample gets what a call at its own timestep alone gives."""

from __future__ import annotations

import pytest
import torch

from ctrl.policy import AnalyticGaussian, StableDiffusionPolicy, UNetPolicy
from ctrl.sampling import make_grid, step_means


def _policies(tiny_pretrained, tiny_sd):
    yield "gaussian", AnalyticGaussian(dim=3, num_labels=2, num_buckets=4)
    yield "unet lora", UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    yield "unet label embedding", UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=True)
    yield "stable diffusion", StableDiffusionPolicy(tiny_sd, prompts=["a cat", "a dog"], lora_rank=2)


def _perturb(policy):
    torch.manual_seed(3)
    with torch.no_grad():
        for group in policy.param_groups():
            for p in group["params"]:
                p.normal_(0, 0.3)


def test_eps_with_a_timestep_per_sample_matches_one_call_per_timestep(tiny_pretrained, tiny_sd):
    for name, policy in _policies(tiny_pretrained, tiny_sd):
        _perturb(policy)
        x = torch.randn(4, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0, 1, 1, 0])
        t = torch.tensor([900, 500, 500, 100])
        with torch.no_grad():
            eps, eps_pre = policy.predict(x, t, labels)
            for i in range(4):
                one, one_pre = policy.predict(x[i : i + 1], t[i], labels[i : i + 1])
                torch.testing.assert_close(eps[i : i + 1], one, atol=1e-5, rtol=1e-4, msg=name)
                torch.testing.assert_close(eps_pre[i : i + 1], one_pre, atol=1e-5, rtol=1e-4, msg=name)


def test_step_means_of_several_steps_are_each_steps_own(tiny_pretrained):
    policy = UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    _perturb(policy)
    grid = make_grid(policy.scheduler, 8, 1.0)  # its last step is deterministic
    x = torch.randn(3, 2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))  # [G, M, ...]
    labels = torch.tensor([0, 1])
    steps = [0, 2, 4]
    with torch.no_grad():
        mean, mean_pre = step_means(policy, x.flatten(0, 1), grid, steps, labels.repeat(3))
        for j, k in enumerate(steps):
            one, one_pre = step_means(policy, x[j], grid, k, labels)
            torch.testing.assert_close(mean[2 * j : 2 * j + 2], one, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mean_pre[2 * j : 2 * j + 2], one_pre, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="stochastic"):
        step_means(policy, x.flatten(0, 1), grid, [0, 2, 7], labels.repeat(3))
