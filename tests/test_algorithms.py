"""Plugin settings out of range, and rewards that return NaN or Inf."""

from __future__ import annotations

import pytest
import torch

from ctrl.algorithms import PPO, RAFT, ContinuousTimePG, DirectBackprop
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import sample


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PPO(clip_range=0.0), r"^PPO.clip_range: must be > 0"),
        (lambda: PPO(timestep_fraction=1.5), r"^PPO.timestep_fraction: must lie in \(0, 1\]"),
        (lambda: PPO(alpha=-0.1), r"^PPO.alpha: the KL weight must be >= 0"),
        (lambda: PPO(inner_epochs=0), r"^PPO.inner_epochs: must be >= 1"),
        (lambda: PPO(steps_per_call=0), r"^PPO.steps_per_call: must be >= 1, got 0\.$"),
        (lambda: RAFT(keep_fraction=0.0), r"^RAFT.keep_fraction: must lie in \(0, 1\]"),
        (lambda: RAFT(selection="tilted", alpha=0.0), r"^RAFT.alpha: must be > 0 with selection 'tilted'"),
        (lambda: RAFT(minibatch_size=0), r"^RAFT.minibatch_size: must be >= 1"),
        (lambda: ContinuousTimePG(value_lr=0.0), r"^ContinuousTimePG.value_lr: must be > 0"),
        (lambda: ContinuousTimePG(clip_range=-1.0), r"^ContinuousTimePG.clip_range: must be > 0"),
        (lambda: DirectBackprop(backprop_steps=0), r"^DirectBackprop.backprop_steps: must be >= 1"),
    ],
)
def test_out_of_range_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class SometimesNaN(GaussianLogLikelihood):
    def forward(self, x0, labels=None):
        r = super().forward(x0, labels)
        return torch.where(torch.arange(len(r)) % 4 == 0, torch.full_like(r, float("nan")), r)


@pytest.mark.parametrize("algorithm", [DirectBackprop(alpha=1.0), PPO(alpha=1.0), RAFT(alpha=1.0, selection="tilted")])
def test_nonfinite_rewards_are_counted_and_dropped(algorithm):
    policy = AnalyticGaussian(dim=2)
    reward = SometimesNaN(y=[1.0, 0.0])
    algorithm.setup(policy, reward)
    labels = torch.zeros(8, dtype=torch.long)
    with torch.set_grad_enabled(algorithm.requires_grad_through_sampler):
        traj = sample(
            policy,
            labels,
            5,
            1.0,
            grad_steps=algorithm.gradient_plan(4).steps,
            generator=torch.Generator().manual_seed(0),
        )
    with pytest.warns(RuntimeWarning, match="NaN or Inf for 2 of 8 samples; they are dropped"):
        outputs = [algorithm.loss(batch, policy, reward) for batch in algorithm.updates(traj, policy, reward)]
    assert outputs
    for out in outputs:
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["reward"])
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in (policy.weight, policy.bias) if p.grad is not None)


class AlwaysNaN(GaussianLogLikelihood):
    def forward(self, x0, labels=None):
        return torch.full((len(x0),), float("nan"))


@pytest.mark.parametrize("algorithm", [PPO(alpha=1.0), RAFT(alpha=1.0, selection="tilted")])
def test_rollout_without_finite_reward_gives_no_update(algorithm):
    policy = AnalyticGaussian(dim=2)
    with torch.no_grad():
        traj = sample(policy, torch.zeros(4, dtype=torch.long), 5, 1.0, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="NaN or Inf for 4 of 4 samples"):
        assert list(algorithm.updates(traj, policy, AlwaysNaN(y=[0.0, 0.0]))) == []


def test_direct_backprop_without_finite_reward_has_zero_finite_loss():
    policy = AnalyticGaussian(dim=2)
    algorithm = DirectBackprop(alpha=1.0)
    traj = sample(
        policy, torch.zeros(4, dtype=torch.long), 5, 1.0, grad_steps=5, generator=torch.Generator().manual_seed(0)
    )
    with pytest.warns(RuntimeWarning, match="NaN or Inf for 4 of 4 samples"):
        out = algorithm.loss(traj, policy, AlwaysNaN(y=[0.0, 0.0]))
    assert float(out["loss"]) == 0.0


def test_ratio_per_dimension_divides_the_policy_gradient_by_the_dimension():
    """DDPO's convention (``ratio_per_dimension``): the importance ratio of log-probabilities averaged over the
    sample's d dimensions. At the rollout's own policy (ratio 1) the surrogate's gradient is the summed one's / d."""
    policy, reward, labels = AnalyticGaussian(dim=3), GaussianLogLikelihood(y=[1.0, 0.0, -1.0]), torch.zeros(8).long()
    with torch.no_grad():
        policy.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        traj = sample(policy, labels, 5, 1.0, generator=torch.Generator().manual_seed(1), pretrained=False)
    grads = []
    for per_dimension in (False, True):
        algorithm = PPO(alpha=0.0, ratio_per_dimension=per_dimension)
        algorithm.setup(policy, reward)
        policy.zero_grad()
        torch.manual_seed(0)
        for batch in algorithm.updates(traj, policy, reward):
            algorithm.loss(batch, policy, reward)["loss"].backward()
        grads.append(policy.bias.grad.clone())
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1] * 3, grads[0])


def test_settings_that_leave_the_tilted_target_say_so():
    """``off_target`` names the setting whose optimum is not p_pre exp(r / alpha) and the value that keeps it (the
    closed-form checks in test_gaussian.py run the settings that answer None)."""
    from ctrl.algorithms import GRPO, PPO, RAFT, ContinuousTimePG, DirectBackprop

    assert PPO(advantages="standardize").off_target().startswith("advantages=standardize")
    assert PPO(advantage_clip=5.0).off_target().startswith("advantage_clip=5 caps each advantage")
    assert PPO().off_target() is None and ContinuousTimePG().off_target() is None
    assert GRPO().off_target().startswith("advantages=standardize")  # GRPO's default, as its paper
    assert GRPO(advantages="center", advantage_clip=None).off_target() is None
    assert RAFT(selection="top").off_target().startswith("selection=top")
    assert RAFT(selection="tilted").off_target() is None
    assert DirectBackprop().off_target() is None
    assert DirectBackprop(backprop_steps=3).off_target().startswith("backprop_steps=3 leaves the steps before")
    biased = DirectBackprop(backprop_steps=3, random_truncation=True, unbiased_truncation=False)
    assert biased.off_target().startswith("unbiased_truncation=false")
