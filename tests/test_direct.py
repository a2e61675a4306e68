"""DirectBackprop's truncation: what each window differentiates, against the whole chain's gradient."""

from __future__ import annotations

import pytest
import torch

from ctrl.algorithms import PPO, RAFT, ContinuousTimePG, DirectBackprop
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import gaussian_kl, make_grid, sample, step_means

STEPS = 5  # trailing spacing: the last step ends at alpha_prev = 1 (deterministic), 4 stochastic steps


def _world(seed: int = 0):
    policy = AnalyticGaussian(dim=2, mean=[1.0, -0.5], std=0.8, num_buckets=STEPS)
    with torch.no_grad():  # a policy away from the pretrained one, so that every step has a KL
        policy.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        policy.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return policy, GaussianLogLikelihood(y=[2.0, 1.0])


def _gradient(algorithm: DirectBackprop, plan, policy, reward, noise, eta: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Gradients of the loss with respect to the correction's (weight, bias) for one rollout and plan."""
    labels = torch.zeros(len(noise), dtype=torch.long)
    policy.zero_grad()
    with torch.enable_grad():
        traj = sample(
            policy,
            labels,
            STEPS,
            eta,
            noise=noise,
            grad_steps=plan.steps,
            grad_weights=plan.weights,
            kl_grad_steps=plan.kl_steps,
            pretrained=algorithm.needs_pretrained,
        )
        algorithm.loss(traj, policy, reward)["loss"].backward()
    return policy.weight.grad.clone(), policy.bias.grad.clone()


def _noise(n: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, STEPS + 1, 2, generator=torch.Generator().manual_seed(seed))


def _bucket(policy, k: int) -> int:
    t = int(make_grid(policy.scheduler, STEPS, 1.0).timesteps[k])
    return t * policy.num_buckets // policy.scheduler.config.num_train_timesteps


def test_one_backprop_step_trains_the_last_stochastic_step():
    """K counts stochastic steps: K = 1 differentiates the last step that has a control (it gave a zero
    gradient when the deterministic last step was counted), and no other step's parameters."""
    policy, reward = _world()
    algorithm = DirectBackprop(alpha=0.0, backprop_steps=1)
    weight, bias = _gradient(algorithm, algorithm.gradient_plan(STEPS - 1), policy, reward, _noise())
    trained = {b for b in range(policy.num_buckets) if bias[b].abs().sum() > 0 or weight[b].abs().sum() > 0}
    assert trained == {_bucket(policy, STEPS - 2)}


def test_steps_before_the_window_keep_their_kl_gradient():
    """With a window of 2, each earlier step's parameters still get the direct gradient of alpha * KL_k at
    the (detached) state the chain passed through: the gradient of re-evaluating that step there."""
    policy, reward = _world()
    alpha, noise = 0.7, _noise()
    algorithm = DirectBackprop(alpha=alpha, backprop_steps=2)
    weight, bias = _gradient(algorithm, algorithm.gradient_plan(STEPS - 1), policy, reward, noise)
    labels = torch.zeros(len(noise), dtype=torch.long)
    with torch.no_grad():
        traj = sample(policy, labels, STEPS, 1.0, noise=noise)
    grid = traj.grid
    for k in range(STEPS - 3):  # the steps before the window (2 stochastic steps, then the deterministic one)
        policy.zero_grad()
        mean, mean_pre = step_means(policy, traj.latents[:, k], grid, k, labels)
        (alpha * gaussian_kl(mean, mean_pre, float(grid.sigma[k])).mean()).backward()
        b = _bucket(policy, k)
        assert policy.bias.grad[b].abs().sum() > 0
        torch.testing.assert_close(bias[b], policy.bias.grad[b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weight[b], policy.weight.grad[b], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k_max", [None, 2])
def test_random_truncation_is_unbiased(k_max):
    """Averaged over the K ~ U{1..K_max} windows (enumerated, same noise), the weighted gradient is exactly
    that of the fixed window K_max (the whole chain when K_max is unset). Without the weights (AlignProp's
    estimator) it is not."""
    policy, reward = _world()
    noise, n = _noise(), STEPS - 1
    fixed = DirectBackprop(alpha=0.5, backprop_steps=k_max)
    target = _gradient(fixed, fixed.gradient_plan(n), policy, reward, noise)
    for unbiased in (True, False):
        algorithm = DirectBackprop(
            alpha=0.5, backprop_steps=k_max, random_truncation=True, unbiased_truncation=unbiased
        )
        draws = [
            _gradient(algorithm, algorithm.window(k, n), policy, reward, noise) for k in range(1, (k_max or n) + 1)
        ]
        mean = [torch.stack(g).mean(0) for g in zip(*draws)]
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(mean, target)) == unbiased


def test_backprop_steps_beyond_the_stochastic_steps_is_refused():
    policy, reward = _world()
    with pytest.raises(ValueError, match=r"^DirectBackprop.backprop_steps: is 10, more than the 9 stochastic steps"):
        ControlModule(policy, reward, DirectBackprop(alpha=1.0, backprop_steps=10), num_steps=10)
    ControlModule(policy, reward, DirectBackprop(alpha=1.0, backprop_steps=9), num_steps=10)


def _deterministic_world():
    """The Gaussian world in float64 with a control away from zero, DirectBackprop at alpha 0, eta 0."""
    policy, reward = _world()
    policy, reward = policy.double(), reward.double()
    module = ControlModule(policy, reward, DirectBackprop(alpha=0.0), num_steps=STEPS, eta=0.0)
    return module, _noise(16).double()


def _deterministic_objective(policy, reward, noise) -> float:
    """E[r(x0)] over the chains of the deterministic DDIM chain from the noise's x_T (its only draw)."""
    labels = torch.zeros(len(noise), dtype=torch.long)
    with torch.no_grad():
        return float(reward(sample(policy, labels, STEPS, 0.0, noise=noise, pretrained=False).samples).mean())


def test_deterministic_chain_gradient_matches_finite_differences():
    """eta 0 (deterministic DDIM, as AlignProp and DRaFT sample): the control acts on every step, the last one
    included, and DirectBackprop's gradient is that of the deterministic chain's objective: central differences
    in float64 on the first step's and the last step's parameters agree with it."""
    module, noise = _deterministic_world()
    policy, reward, algorithm = module.policy, module.reward, module.algorithm
    assert module.algorithm_context.num_stochastic == STEPS  # every step is controlled
    weight, bias = _gradient(algorithm, algorithm.gradient_plan(STEPS), policy, reward, noise, eta=0.0)
    first, last, h = _bucket(policy, 0), _bucket(policy, STEPS - 1), 1e-5
    for tensor, grad, index in ((policy.bias, bias, (first, 1)), (policy.weight, weight, (last, 0, 1))):
        with torch.no_grad():
            tensor[index] += h
            up = _deterministic_objective(policy, reward, noise)
            tensor[index] -= 2 * h
            down = _deterministic_objective(policy, reward, noise)
            tensor[index] += h
        assert abs(grad[index]) > 1e-3
        assert float(-grad[index]) == pytest.approx((up - down) / (2 * h), rel=1e-5)  # the loss is -objective


def test_deterministic_chain_k_counts_every_step():
    """DRaFT-1 on the deterministic chain trains the last step, the one a stochastic chain leaves uncontrolled."""
    module, noise = _deterministic_world()
    algorithm = DirectBackprop(alpha=0.0, backprop_steps=1)
    weight, bias = _gradient(algorithm, algorithm.gradient_plan(STEPS), module.policy, module.reward, noise, eta=0.0)
    trained = {b for b in range(module.policy.num_buckets) if bias[b].abs().sum() > 0 or weight[b].abs().sum() > 0}
    assert trained == {_bucket(module.policy, STEPS - 1)}


@pytest.mark.parametrize(
    "algorithm, message",
    [
        (
            lambda: DirectBackprop(alpha=0.1),
            r"^DirectBackprop\.alpha: is 0\.1 but model\.eta is 0: the KL of a deterministic chain .* is undefined",
        ),
        (lambda: PPO(alpha=0.0), r"^ControlModule\.eta: is 0\.0: PPO does not backpropagate .*set it in \(0, 1\]"),
        (lambda: RAFT(alpha=0.0), r"^ControlModule\.eta: is 0\.0: RAFT does not backpropagate"),
        (lambda: ContinuousTimePG(alpha=0.0), r"^ControlModule\.eta: is 0\.0: ContinuousTimePG does not"),
    ],
)
def test_deterministic_chain_refusals(algorithm, message):
    policy, reward = _world()
    with pytest.raises(ValueError, match=message):
        ControlModule(policy, reward, algorithm(), num_steps=STEPS, eta=0.0)
