"""The flow-matching sampler against closed forms: the Gaussian world's exact velocity, diffusers' Euler step, the
marginals of the ODE and of the stochastic (Flow-GRPO) chain, and the refusals of what it does not take."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ctrl.algorithms import PPO
from ctrl.errors import SettingError
from ctrl.inference_time import SMC
from ctrl.linear_gaussian import chain_moments
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian, AnalyticGaussianFlow
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import make_grid, sample, step_means

M, S = [1.0, -0.5], 0.8


def _policy(**kw) -> AnalyticGaussianFlow:
    return AnalyticGaussianFlow(dim=2, mean=M, std=S, **kw)


def _closed_form(policy: AnalyticGaussianFlow, t: float) -> tuple[torch.Tensor, float]:
    """Mean ``[d]`` and variance of x_t = (1 - t) x_0 + t z for x_0 ~ N(m, s^2 I)."""
    return (1 - t) * policy.mean.double(), (1 - t) ** 2 * policy.std**2 + t**2


@pytest.mark.parametrize("t", [0.9, 0.5, 0.1])
def test_velocity_is_the_conditional_expectation_of_z_minus_x0(t):
    """v_pre(x_t) = E[z - x_0 | x_t]: its residual has mean 0 and is uncorrelated with x_t (v is affine, and so is
    the true conditional expectation of a Gaussian, so these two moments pin it down)."""
    policy = _policy()
    g = torch.Generator().manual_seed(0)
    x0 = policy.mean + policy.std * torch.randn(400_000, 2, generator=g)
    z = torch.randn(400_000, 2, generator=g)
    xt = (1 - t) * x0 + t * z
    residual = (z - x0) - policy.pretrained_prediction(xt, torch.tensor(t * 1000.0))
    assert residual.mean(0).abs().max() < 0.01
    covariance = (residual - residual.mean(0)).T @ (xt - xt.mean(0)) / len(xt)
    assert covariance.abs().max() < 0.01


def test_euler_step_at_eta_zero_is_diffusers():
    """At noise level 0 a step is diffusers' FlowMatchEulerDiscreteScheduler.step, on every step of a shifted grid."""
    policy = _policy(shift=3.0)
    grid = make_grid(policy.scheduler, 8, 0.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.full((5,), policy.null_label)
    for k, t in enumerate(reference.timesteps):
        v = policy.pretrained_prediction(x, t)
        expected = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(step_means(policy, x, grid, k, labels)[0], expected, atol=1e-6, rtol=0)
        x = expected


@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_forward_noising_and_its_true_prediction_recover_x0(kind):
    """add_noise and true_prediction (RAFT's denoising target) agree with predict_x0 on both kinds of grid."""
    policy = _policy() if kind == "flow" else AnalyticGaussian(dim=2, mean=M, std=S)
    grid = make_grid(policy.scheduler, 10, 1.0)
    g = torch.Generator().manual_seed(2)
    x0, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    for k in range(9):  # the last step of a flow grid is at t near 0, of a DDIM grid at a near 1: both exact
        x = grid.add_noise(x0, z, k)
        torch.testing.assert_close(grid.predict_x0(x, grid.true_prediction(x0, z), k), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_every_marginal_of_the_chain_is_the_closed_form(eta):
    """On a fine grid the chain's exact marginals (its steps are affine) follow N((1 - t) m, V_t I) at every t, with
    noise (Flow-GRPO's SDE) as without (the Euler ODE); the samples x_0 are the data N(m, s^2 I).

    With noise, the first step from t = 1 has a finite variance where the SDE's diffusion is infinite (s_t is read
    at the grid's second point): the marginal right after it is too wide by about eta^4 / 4 in variance, and the
    chain's contraction brings it back (measured within 0.021 from t = 0.9 on, 0.005 at x_0, for eta 0.7)."""
    policy = _policy()
    steps = policy.affine_steps(1000, eta, control_scale=0.0)
    grid = make_grid(policy.scheduler, 1000, eta)
    for k in range(0, 1000, 25):
        t = float(grid.t_prev[k])
        mean, cov = chain_moments(steps[: k + 1])
        expected_mean, expected_var = _closed_form(policy, t)
        torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=0)
        if t <= 0.9 or eta == 0:
            expected_cov = expected_var * torch.eye(2, dtype=cov.dtype)
            torch.testing.assert_close(cov, expected_cov, atol=0.03 * expected_var, rtol=0)
    mean, var = policy.pretrained_marginal(1000, eta)
    torch.testing.assert_close(mean, policy.mean, atol=1e-5, rtol=0)
    assert abs(var - S**2) < 0.01 * S**2


def test_stochastic_samples_have_the_chains_exact_moments_and_the_odes_marginal():
    """50 steps at Flow-GRPO's noise level 0.7: 40,000 sampled chains have the moments of the exact chain, and
    those equal the data's (and the ODE's on a fine grid) within 1 %."""
    policy = _policy()
    labels = torch.full((40_000,), policy.null_label)
    x = sample(policy, labels, 50, 0.7, generator=torch.Generator().manual_seed(0)).samples
    mean, var = policy.pretrained_marginal(50, 0.7)
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), var * torch.eye(2), atol=0.02, rtol=0)
    ode_mean, ode_var = policy.pretrained_marginal(1000, 0.0)
    torch.testing.assert_close(mean, ode_mean, atol=1e-4, rtol=0)
    assert abs(var - ode_var) < 0.01 * ode_var


def test_kl_is_zero_for_the_pretrained_policy_and_exact_after_a_change():
    """The per-step KL of a flow chain: 0 at initialisation, ||mu - mu_pre||^2 / (2 sigma_k^2) after the control
    moves the mean by a known constant (a bias b on the velocity moves step k's mean by dt (1 + c (1 - t)) b)."""
    policy = _policy()
    labels = torch.zeros(16, dtype=torch.long)
    traj = sample(policy, labels, 10, 0.7, generator=torch.Generator().manual_seed(0))
    assert traj.kl.abs().max() == 0
    with torch.no_grad():
        policy.bias.fill_(0.3)
    traj = sample(policy, labels, 10, 0.7, generator=torch.Generator().manual_seed(0))
    grid = traj.grid
    for k in range(10):
        t, dt, s = float(grid.t[k]), float(grid.t_prev[k] - grid.t[k]), float(grid.noise[k])
        shift = dt * (1 + s * s / (2 * t) * (1 - t)) * 0.3
        expected = 0.0 if grid.sigma[k] == 0 else 2 * shift**2 / (2 * float(grid.sigma[k]) ** 2)
        torch.testing.assert_close(traj.kl[:, k], torch.full((16,), expected), rtol=1e-4, atol=1e-6)


def test_what_the_flow_sampler_does_not_take_is_refused():
    policy = _policy()
    with pytest.raises(SettingError, match=r"^ControlModule\.eta: is the flow sampler's noise level and must be >= 0"):
        ControlModule(policy, GaussianLogLikelihood(y=[0.0, 0.0]), PPO(alpha=1.0), eta=-0.1)
    with pytest.raises(ValueError, match=r"noise level eta of a flow-matching sampler must be >= 0"):
        make_grid(policy.scheduler, 10, -0.1)
    shifting = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"shifts its grid by the image size \(use_dynamic_shifting"):
        make_grid(shifting, 10, 0.7)
    with pytest.raises(ValueError, match=r"^SMC guides DDPM/DDIM \(noise-prediction\) models; .*FlowMatchEuler"):
        SMC().sample(policy, GaussianLogLikelihood(y=[0.0, 0.0]), torch.zeros(2).long(), torch.arange(2), 10)
    # a noise level above DDIM's eta range is a flow sampler's right
    ControlModule(policy, GaussianLogLikelihood(y=[0.0, 0.0]), PPO(alpha=1.0), eta=2.0)
