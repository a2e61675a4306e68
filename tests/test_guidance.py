"""Inference-time guidance baselines on the closed-form Gaussian world: SMC reaches the tilted target, the
others reduce to the pretrained sampler at zero strength and raise the reward above it, and each counts
its cost as it should."""

from __future__ import annotations

import pytest
import torch

from ctrl.evaluation import tilted_gaussian
from ctrl.guidance import MPGD, SMC, SVDD, ClassifierFreeGuidance, ReconstructionGuidance
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


def _gaussian_cfg(policy, means: dict[tuple[int, ...], list[float]], sizes: list[int], scale: float):
    """A ClassifierFreeGuidance whose conditional model is exact: for the label tuple ``l`` (null = size) the
    data are N(means[l], std^2 I), so its eps is the closed form of that Gaussian."""
    import itertools

    from ctrl.pretrain import condition_codes

    tuples = list(itertools.product(*[range(n + 1) for n in sizes]))
    table = torch.zeros(len(tuples), policy.dim)
    for code, labels in zip(condition_codes(torch.tensor(tuples), sizes).tolist(), tuples):
        table[code] = torch.tensor(means.get(labels, [9.0] * policy.dim))  # never-trained joint rows: must go unused
    alphas = policy.alphas_cumprod

    def model(x, t, codes):
        a = alphas[t.long()]
        return (1 - a).sqrt() * (x - a.sqrt() * table[codes]) / (a * policy.std**2 + 1 - a)

    sampler = ClassifierFreeGuidance(pretrained="unused", scale=scale)
    sampler.model, sampler.sizes, sampler.alphas_cumprod = model, sizes, policy.scheduler.alphas_cumprod.float()
    return sampler


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_is_the_chain_of_the_guided_gaussian(scale):
    """eps is affine in the data mean, so with exact conditional Gaussians CFG at scale w is exactly the
    pretrained chain of N(m_null + w (m_y - m_null), std^2): same noise, same samples."""
    policy = AnalyticGaussian(dim=2, mean=[0.0, 0.0], std=0.7)
    policy.num_labels = 2
    m_null, m = [0.5, -0.5], {(0,): [2.0, 1.0], (1,): [-1.0, 0.0], (2,): [0.5, -0.5]}
    sampler = _gaussian_cfg(policy, m, [2], scale)
    labels, seeds = torch.tensor([0, 1] * 32), torch.arange(64)
    out = sampler.sample(policy, None, labels, seeds, STEPS)
    for y in (0, 1):
        target = [a + scale * (b - a) for a, b in zip(m_null, m[(y,)])]
        expected = _pretrained(AnalyticGaussian(dim=2, mean=target, std=0.7), labels[labels == y], seeds[labels == y])
        torch.testing.assert_close(out.samples[labels == y], expected, atol=1e-4, rtol=0)
    assert out.denoiser_calls_per_image == 2 * STEPS


def test_classifier_free_guidance_composes_label_sets():
    """Two label sets, each learned alone: condition (a, b) samples the chain of
    N(m_null + w (m_(a,null) - m_null) + w (m_(null,b) - m_null)); the joint rows are never read."""
    policy = AnalyticGaussian(dim=2, mean=[0.0, 0.0], std=0.7)
    policy.num_labels = 6  # sizes [3, 2], condition = a * 2 + b
    means = {(3, 2): [0.0, 0.0], (0, 2): [1.0, 0.0], (1, 2): [0.0, 1.0], (2, 2): [-1.0, -1.0],
             (3, 0): [0.5, 0.5], (3, 1): [-0.5, 0.0]}
    scale = 1.5
    sampler = _gaussian_cfg(policy, means, [3, 2], scale)
    labels, seeds = torch.arange(6).repeat_interleave(8), torch.arange(48)
    out = sampler.sample(policy, None, labels, seeds, STEPS)
    for c in range(6):
        a, b = divmod(c, 2)
        target = [scale * (u + v) for u, v in zip(means[(a, 2)], means[(3, b)])]
        expected = _pretrained(AnalyticGaussian(dim=2, mean=target, std=0.7), labels[labels == c], seeds[labels == c])
        torch.testing.assert_close(out.samples[labels == c], expected, atol=1e-4, rtol=0)
    assert out.denoiser_calls_per_image == 3 * STEPS


def test_bad_settings_are_refused():
    for make in (lambda: ClassifierFreeGuidance(), lambda: ClassifierFreeGuidance(pretrained="a", config="b"),
                 lambda: ClassifierFreeGuidance(pretrained="a", scale=-1), lambda: SMC(num_particles=0), lambda: SMC(lam=0), lambda: SVDD(num_candidates=0),
                 lambda: ReconstructionGuidance(scale=-1), lambda: MPGD(step_size=-1)):
        with pytest.raises(ValueError):
            make()
