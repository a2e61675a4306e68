"""Inference-time guidance baselines on the closed-form Gaussian world: SMC reaches the tilted target, the
others reduce to the pretrained sampler at zero strength and raise the reward above it, and each counts
its cost as it should."""

from __future__ import annotations

import pytest
import torch

from ctrl.evaluation import tilted_gaussian
from ctrl.guidance import MPGD, SMC, SVDD, ReconstructionGuidance
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import sample, seeded_noise

STEPS = 20


@pytest.fixture
def world():
    policy = AnalyticGaussian(dim=2, mean=[1.0, -0.5], std=0.8)
    reward = GaussianLogLikelihood(y=[2.0, 1.0], A=[[1.0, 0.5], [0.0, 1.0]], sigma=1.0)
    return policy, reward


def _pretrained(policy, labels, seeds):
    noise = seeded_noise(seeds, STEPS, policy.sample_shape)
    return sample(policy, labels, STEPS, 1.0, guidance=0.0, noise=noise).samples


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_smc_reaches_the_tilted_target(world, lam):
    """With enough particles the samples follow p_pre(x) exp(lam r(x)) / Z: mean and covariance against the
    closed form (alpha = 1 / lam) within 0.06, the same bar as the fine-tuning plugins' check."""
    policy, reward = world
    n = 4000
    out = SMC(num_particles=64, lam=lam).sample(policy, reward, torch.zeros(n, dtype=torch.long),
                                                torch.arange(n), STEPS)
    mean_pre, var_pre = policy.pretrained_marginal(STEPS, 1.0)
    mean_t, cov_t = tilted_gaussian(mean_pre, var_pre ** 0.5, reward.A, reward.y, reward.sigma, 1.0 / lam)
    x = out.samples.double()
    assert (x.mean(0) - mean_t).norm() / mean_t.norm() < 0.06
    assert (torch.cov(x.T) - cov_t).norm() / cov_t.norm() < 0.06
    # and far from the pretrained model's mean, so the check has teeth
    assert (mean_pre.double() - mean_t).norm() / mean_t.norm() > 0.3


@pytest.mark.parametrize("sampler", [ReconstructionGuidance(scale=0.0), MPGD(step_size=0.0), SVDD(num_candidates=1)],
                         ids=lambda s: type(s).__name__)
def test_zero_strength_is_the_pretrained_sampler(world, sampler):
    policy, reward = world
    labels, seeds = torch.zeros(64, dtype=torch.long), torch.arange(64)
    torch.testing.assert_close(sampler.sample(policy, reward, labels, seeds, STEPS).samples,
                               _pretrained(policy, labels, seeds), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler, denoiser_calls, reward_calls", [
    (ReconstructionGuidance(scale=1.0), STEPS, STEPS),
    (MPGD(step_size=0.3), STEPS, STEPS),
    (SVDD(num_candidates=4), 1 + 4 * (STEPS - 1), 4 * STEPS),
    (SMC(num_particles=8), 8 * STEPS, 8 * (STEPS + 1)),
], ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v))
def test_guidance_raises_the_reward_and_counts_its_cost(world, sampler, denoiser_calls, reward_calls):
    policy, reward = world
    labels, seeds = torch.zeros(500, dtype=torch.long), torch.arange(500)
    out = sampler.sample(policy, reward, labels, seeds, STEPS)
    guided, pretrained = reward(out.samples).mean(), reward(_pretrained(policy, labels, seeds)).mean()
    assert guided > pretrained + 0.3, (float(guided), float(pretrained))
    assert out.denoiser_calls_per_image == denoiser_calls and out.reward_calls_per_image == reward_calls
    assert out.seconds_per_image > 0


def test_bad_settings_are_refused():
    for make in (lambda: SMC(num_particles=0), lambda: SMC(lam=0), lambda: SVDD(num_candidates=0),
                 lambda: ReconstructionGuidance(scale=-1), lambda: MPGD(step_size=-1)):
        with pytest.raises(ValueError):
            make()
