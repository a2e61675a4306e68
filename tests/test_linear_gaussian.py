"""The closed forms of a linear-Gaussian chain (ctrl.linear_gaussian) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from ctrl.evaluation import relative_errors, tilted_gaussian
from ctrl.linear_gaussian import AffineStep, chain_moments, chain_objective, chain_optimum
from ctrl.policy import AnalyticGaussian
from ctrl.sampling import sample

A, Y, SIGMA = torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.tensor([2.0, 1.0]), 1.0


def _policy() -> AnalyticGaussian:
    return AnalyticGaussian(dim=2, mean=[1.0, -0.5], std=0.8)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_riccati_optimum_equals_a_brute_force_optimisation(alpha):
    """Maximising E[r] - alpha KL over every affine mean control by L-BFGS on the exact objective finds
    the Riccati solution: same objective value and same x_0 moments."""
    pretrained = _policy().affine_steps(4, 1.0, control_scale=0.0)
    optimal, mean, cov = chain_optimum(pretrained, A, Y, SIGMA, alpha)
    controls = [
        (
            torch.zeros(2, 2, dtype=torch.float64, requires_grad=True),
            torch.zeros(2, dtype=torch.float64, requires_grad=True),
        )
        for _ in pretrained
    ]
    params = [p for c in controls for p in c]

    def chain():
        return [AffineStep(p.F + U, p.g + v, p.sigma) if p.sigma > 0 else p for p, (U, v) in zip(pretrained, controls)]

    optimiser = torch.optim.LBFGS(
        params, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = -chain_objective(pretrained, chain(), A, Y, SIGMA, alpha)
        loss.backward()
        return loss

    for _ in range(5):
        optimiser.step(closure)
    with torch.no_grad():
        brute = chain_objective(pretrained, chain(), A, Y, SIGMA, alpha)
        riccati = chain_objective(pretrained, optimal, A, Y, SIGMA, alpha)
        brute_mean, brute_cov = chain_moments(chain())
    assert abs(float(brute - riccati)) < 1e-9
    assert riccati > chain_objective(pretrained, pretrained, A, Y, SIGMA, alpha)  # control helps
    torch.testing.assert_close(brute_mean, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(brute_cov, cov, atol=1e-6, rtol=0)


def test_chain_optimum_meets_the_continuous_target_as_the_grid_refines():
    """The discrete chain's optimum differs from p_pre exp(r / alpha) / Z on a coarse grid (the optimal
    step variance is not the pretrained one) and converges to it as the grid refines."""
    policy, errors = _policy(), []
    for n in (10, 50, 1000):
        _, mean, cov = chain_optimum(policy.affine_steps(n, 1.0, control_scale=0.0), A, Y, SIGMA, 1.0)
        pre_mean, pre_var = policy.pretrained_marginal(n, 1.0)
        errors.append(
            float(relative_errors(mean, cov, *tilted_gaussian(pre_mean, math.sqrt(pre_var), A, Y, SIGMA, 1.0))[1])
        )
    assert errors[0] > 0.05 and errors[0] > errors[1] > errors[2] and errors[2] < 0.005


def test_chain_moments_of_a_controlled_policy_match_its_samples():
    """The policy's own chain, read as affine steps, has the moments its samples show."""
    policy = _policy()
    with torch.no_grad():
        policy.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        policy.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        x = sample(
            policy, torch.zeros(100_000, dtype=torch.long), 10, 1.0, generator=torch.Generator().manual_seed(2)
        ).samples.double()
    mean, cov = chain_moments(policy.affine_steps(10, 1.0))
    # 100k samples: standard errors about 0.003 on the mean and 0.005 on the covariance entries
    torch.testing.assert_close(x.mean(0), mean, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.025, rtol=0)


def test_gaussian_policy_without_conditions_is_refused():
    with pytest.raises(ValueError, match=r"^AnalyticGaussian\.num_labels: must be >= 1, got 0"):
        AnalyticGaussian(num_labels=0)
