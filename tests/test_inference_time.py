"""Inference-time guidance baselines on the closed-form Gaussian world: SMC reaches the tilted target, the
others reduce to the pretrained sampler at zero strength and raise the reward above it, and each counts
its cost as it should."""

from __future__ import annotations

import pytest
import torch

from ctrl.evaluation import tilted_gaussian
from ctrl.inference_time import MPGD, SMC, SVDD, ClassifierFreeGuidance, ReconstructionGuidance
from ctrl.inference_time.base import GuidedSampler
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
    return sample(policy, labels, STEPS, 1.0, control_scale=0.0, noise=noise).samples


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_smc_reaches_the_tilted_target(world, lam):
    """With enough particles the samples follow p_pre(x) exp(lam r(x)) / Z: mean and covariance against the
    closed form (alpha = 1 / lam) within 0.06, the same bar as the fine-tuning plugins' check."""
    policy, reward = world
    n = 4000
    out = SMC(num_particles=64, lam=lam).sample(
        policy, reward, torch.zeros(n, dtype=torch.long), torch.arange(n), STEPS
    )
    mean_pre, var_pre = policy.pretrained_marginal(STEPS, 1.0)
    mean_t, cov_t = tilted_gaussian(mean_pre, var_pre**0.5, reward.A, reward.y, reward.sigma, 1.0 / lam)
    x = out.samples.double()
    assert (x.mean(0) - mean_t).norm() / mean_t.norm() < 0.06
    assert (torch.cov(x.T) - cov_t).norm() / cov_t.norm() < 0.06
    # and far from the pretrained model's mean, so the check has teeth
    assert (mean_pre.double() - mean_t).norm() / mean_t.norm() > 0.3


def test_smc_reaches_the_tilted_target_from_a_wide_prior():
    """A wide prior (data sd 100, 1-D) makes x0_hat(x_T), and so the initial twist lam * r(x0_hat(x_T)), vary
    a lot between particles: SMC must weigh x_T by it (the increments telescope to lam * (r(x0) - that
    twist)), or its mean lands about halfway between the pretrained and the tilted one (38 against 71).

    Tolerance from the Monte-Carlo error: each image returns one particle of its own independent particle
    set, so the n sample mean has standard error sd_t / sqrt(n) (0.94 here) and the sample sd about
    sd_t / sqrt(2 n) (0.67); the self-normalised weights add an O(1/K) bias, budgeted sd_t / K (0.66;
    measured with 20,000 images: mean -2.0 at K = 8, -0.5 at 16, within the 0.3 error at 32 to 128).
    Bound: 4 standard errors + sd_t / K (4.4 on the mean, 3.3 on the sd; over 20 blocks of 2,000 seeds
    the largest errors were 2.0 and 1.3)."""
    policy = AnalyticGaussian(dim=1, mean=0.0, std=100.0)
    reward = GaussianLogLikelihood(y=[100.0], sigma=50.0)
    n, k, lam = 2000, 64, 1.0
    out = SMC(num_particles=k, lam=lam).sample(
        policy, reward, torch.zeros(n, dtype=torch.long), torch.arange(n), STEPS
    )
    mean_pre, var_pre = policy.pretrained_marginal(STEPS, 1.0)
    mean_t, cov_t = tilted_gaussian(mean_pre, var_pre**0.5, reward.A, reward.y, reward.sigma, 1.0 / lam)
    mean_t, sd_t = float(mean_t), float(cov_t) ** 0.5
    x = out.samples.double().flatten()
    mean, sd = float(x.mean()), float(x.std())
    print(
        f"SMC wide prior: mean {mean:.2f} (target {mean_t:.2f}, pretrained {float(mean_pre):.2f}), "
        f"sd {sd:.2f} (target {sd_t:.2f})"
    )
    assert abs(mean - mean_t) < 4 * sd_t / n**0.5 + sd_t / k, (mean, mean_t)
    assert abs(sd - sd_t) < 4 * sd_t / (2 * n) ** 0.5 + sd_t / k, (sd, sd_t)
    assert mean_t - float(mean_pre) > 20 * sd_t / n**0.5  # the tilt moves the mean far beyond the bound


class _Probe(GuidedSampler):
    """Keeps the extra-draw generator's first draw, shaped like one chain's noise ``[N+1, ...]``, in ``first``."""

    def run(self, policy, reward, labels, grid, noise, generator):
        self.first = torch.randn(noise.shape[1:], generator=generator)
        return noise[:, 0]


def _first_extra_draw(policy, seeds: list[int]):
    probe = _Probe()
    probe.sample(policy, None, torch.zeros(len(seeds), dtype=torch.long), torch.tensor(seeds), STEPS)
    return probe.first


@pytest.mark.parametrize("s", [0, 7, 1 << 40], ids=["eval", "eval7", "train"])
def test_extra_draws_are_not_another_chains_noise(world, s):
    """Candidates and particles come from a generator of their own: for chains with seeds [s, s+1] its first
    draws are not those of a generator seeded with either seed (seeded_noise: one generator per chain, so
    that is the chain's x_T and step noise), they depend on every seed of the batch, not on the first
    alone, and the same seeds give the same draws."""
    policy, _ = world
    first = _first_extra_draw(policy, [s, s + 1])
    for seed in (s, s + 1):
        chain = seeded_noise(torch.tensor([seed]), STEPS, policy.sample_shape)[0]  # [N+1, d]
        torch.testing.assert_close(chain, torch.randn(chain.shape, generator=torch.Generator().manual_seed(seed)))
        assert not (first == chain).any(), f"the extra draws repeat chain {seed}'s noise"
    assert not torch.equal(first, _first_extra_draw(policy, [s, s + 2]))
    assert torch.equal(first, _first_extra_draw(policy, [s, s + 1]))


@pytest.mark.parametrize(
    "sampler", [SMC(num_particles=8), SVDD(num_candidates=4, temperature=1.0)], ids=lambda s: type(s).__name__
)
def test_samplers_with_extra_draws_are_reproducible(world, sampler):
    """The same seeds give the same samples, in a new sampler call and whatever ran in between."""
    policy, reward = world
    labels, seeds = torch.zeros(16, dtype=torch.long), torch.arange(100, 116)
    first = sampler.sample(policy, reward, labels, seeds, STEPS).samples
    torch.randn(10)  # the global generator plays no part
    sampler.sample(policy, reward, labels, seeds + 16, STEPS)
    torch.testing.assert_close(sampler.sample(policy, reward, labels, seeds, STEPS).samples, first, atol=0, rtol=0)


@pytest.mark.parametrize(
    "sampler",
    [ReconstructionGuidance(scale=0.0), MPGD(step_size=0.0), SVDD(num_candidates=1)],
    ids=lambda s: type(s).__name__,
)
def test_zero_strength_is_the_pretrained_sampler(world, sampler):
    policy, reward = world
    labels, seeds = torch.zeros(64, dtype=torch.long), torch.arange(64)
    torch.testing.assert_close(
        sampler.sample(policy, reward, labels, seeds, STEPS).samples,
        _pretrained(policy, labels, seeds),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize(
    "sampler, denoiser_calls, reward_calls",
    [
        (ReconstructionGuidance(scale=1.0), STEPS, STEPS),
        (MPGD(step_size=0.3), STEPS, STEPS),
        (SVDD(num_candidates=4), 1 + 4 * (STEPS - 1), 4 * STEPS),
        (SMC(num_particles=8), 8 * STEPS, 8 * (STEPS + 1)),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v),
)
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

    from ctrl.conditions import condition_codes

    tuples = list(itertools.product(*[range(n + 1) for n in sizes]))
    table = torch.zeros(len(tuples), policy.dim)
    for code, labels in zip(condition_codes(torch.tensor(tuples), sizes).tolist(), tuples):
        table[code] = torch.tensor(means.get(labels, [9.0] * policy.dim))  # never-trained joint rows: must go unused
    alphas = policy.alphas_cumprod

    def model(x, t, codes):
        a = alphas[t.long()]
        return (1 - a).sqrt() * (x - a.sqrt() * table[codes]) / (a * policy.std**2 + 1 - a)

    sampler = ClassifierFreeGuidance(scale=scale)
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
    means = {
        (3, 2): [0.0, 0.0],
        (0, 2): [1.0, 0.0],
        (1, 2): [0.0, 1.0],
        (2, 2): [-1.0, -1.0],
        (3, 0): [0.5, 0.5],
        (3, 1): [-0.5, 0.0],
    }
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
    for make in (
        lambda: ClassifierFreeGuidance(pretrained="/nonexistent"),
        lambda: ClassifierFreeGuidance(scale=-1),
        lambda: SMC(num_particles=0),
        lambda: SMC(alpha=0),
        lambda: SMC(lam=0),
        lambda: SVDD(num_candidates=0),
        lambda: ReconstructionGuidance(scale=-1),
        lambda: MPGD(step_size=-1),
    ):
        with pytest.raises((ValueError, FileNotFoundError)):
            make()
