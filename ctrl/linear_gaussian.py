"""Closed forms of a linear-Gaussian sampling chain: its exact moments and its own KL-regularised optimum.

A chain whose every step is affine, ``x_{k-1} = F_k x_k + g_k + sigma_k z`` with ``x_N ~ N(0, I)``
(the AnalyticGaussian world, and any policy whose control is affine in x), has Gaussian marginals
that propagate exactly (:func:`chain_moments`).

The fine-tuning objective ``E[r(x_0)] - alpha * sum_k KL_k`` with a quadratic reward
``r(x) = -||A x - y||^2 / (2 s^2)`` and a control that moves each step's MEAN by ``u_k(x_k)``
(``KL_k = ||u_k||^2 / (2 sigma_k^2)``, the step variance kept at the pretrained sigma_k, as every
policy of this library has it) is a linear-quadratic control problem. Its optimum over that family
is itself closed form, by a backward (Riccati) recursion on the value function
``V_k(x) = -x^T P_k x / 2 + q_k^T x + const`` (:func:`chain_optimum`):

    V_0 = r:        P = A^T A / s^2,  q = A^T y / s^2
    controlled step (beta = alpha / sigma_k^2, M = P + beta I):
        u*(x) = M^-1 (q - P m(x)),  m(x) = F x + g the pretrained mean,
        P <- F^T (beta M^-1 P) F,   q <- F^T (beta M^-1 q - beta M^-1 P g)
    uncontrolled step (sigma_k = 0, or outside the trained steps):  P <- F^T P F,  q <- F^T (q - P g)

The step noise only adds constants (certainty equivalence). This optimum is what a discrete chain
with a mean-only control can reach: the continuous-time target ``p_pre(x) exp(r(x) / alpha) / Z``
would also need other step variances, so on a coarse grid the two differ, and only the former
separates an estimator's error from the family's. As the grid refines they meet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AffineStep", "chain_moments", "chain_optimum", "chain_objective"]


@dataclass
class AffineStep:
    """One step ``x' = F x + g + sigma z``: ``F`` ``[d, d]``, ``g`` ``[d]`` (float64), ``sigma`` >= 0."""

    F: Tensor
    g: Tensor
    sigma: float


def _marginals(steps: list[AffineStep]) -> Iterator[tuple[Tensor, Tensor]]:
    """Mean ``[d]`` and covariance ``[d, d]`` of the state before each step, then of x_0 (N+1 pairs), from N(0, I)."""
    eye = torch.eye(steps[0].g.numel(), dtype=torch.float64)
    mean, cov = torch.zeros(len(eye), dtype=torch.float64), eye
    for step in steps:
        yield mean, cov
        mean, cov = step.F @ mean + step.g, step.F @ cov @ step.F.T + step.sigma**2 * eye
    yield mean, cov


def chain_moments(steps: list[AffineStep]) -> tuple[Tensor, Tensor]:
    """Mean ``[d]`` and covariance ``[d, d]`` of x_0 for the chain ``steps`` (in sampling order) from N(0, I)."""
    return deque(_marginals(steps), maxlen=1)[0]


def chain_optimum(
    pretrained: list[AffineStep],
    A: Tensor,
    y: Tensor,
    sigma: float,
    alpha: float,
    controlled: list[bool] | None = None,
) -> tuple[list[AffineStep], Tensor, Tensor]:
    """The optimum of ``E[r(x_0)] - alpha KL`` over mean controls of the chain ``pretrained`` (module docstring).

    Args:
        pretrained: the pretrained chain's steps in sampling order (noise to data).
        A, y, sigma: the reward ``-||A x - y||^2 / (2 sigma^2)`` (``A`` ``[m, d]``, ``y`` ``[m]``).
        alpha: the KL weight (> 0).
        controlled: ``[N]``, which steps the control may move (default: every step with sigma > 0).

    Returns:
        The optimal chain's steps, and the mean ``[d]`` and covariance ``[d, d]`` of its x_0.
    """
    if alpha <= 0:
        raise ValueError(f"the chain's optimum needs a KL weight alpha > 0, got {alpha}")
    A, y = A.double(), y.double()
    d = pretrained[0].g.numel()
    eye = torch.eye(d, dtype=torch.float64)
    controlled = controlled or [s.sigma > 0 for s in pretrained]
    P, q = A.T @ A / sigma**2, A.T @ y / sigma**2
    optimal: list[AffineStep] = []
    for step, free in zip(reversed(pretrained), reversed(controlled)):
        if free and step.sigma > 0:
            beta = alpha / step.sigma**2
            shrink = beta * torch.linalg.inv(P + beta * eye)  # beta M^-1
            M_inv_q = shrink @ q / beta
            optimal.append(AffineStep(shrink @ step.F, shrink @ step.g + M_inv_q, step.sigma))
            P, q = shrink @ P, shrink @ q
        else:
            optimal.append(step)
        P, q = step.F.T @ P @ step.F, step.F.T @ (q - P @ step.g)
        P = (P + P.T) / 2
    optimal.reverse()
    return (optimal, *chain_moments(optimal))


def chain_objective(
    pretrained: list[AffineStep], steps: list[AffineStep], A: Tensor, y: Tensor, sigma: float, alpha: float
) -> Tensor:
    """``E[r(x_0)] - alpha * sum_k E[||mu_k - mu_pre_k||^2] / (2 sigma_k^2)`` of the affine chain ``steps``
    against ``pretrained`` (same sigmas), exactly; differentiable in the steps' F and g."""
    marginals = list(_marginals(steps))
    kl = torch.zeros((), dtype=torch.float64)
    for pre, step, (mean, cov) in zip(pretrained, steps, marginals):
        if pre.sigma > 0:
            U, v = step.F - pre.F, step.g - pre.g  # the control u(x) = U x + v
            kl = kl + (torch.trace(U @ cov @ U.T) + (U @ mean + v).square().sum()) / (2 * pre.sigma**2)
    mean, cov = marginals[-1]
    A, y = A.double(), y.double()
    reward = -(torch.trace(A @ cov @ A.T) + (A @ mean - y).square().sum()) / (2 * sigma**2)
    return reward - alpha * kl
