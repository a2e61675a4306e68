"""Estimators of the score-function algorithms: PPO's (and ContinuousTimePG's) advantage baselines and RAFT's
minibatch weights must leave the expected gradient of the KL-regularised objective unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ctrl.algorithms import PPO, RAFT, ContinuousTimePG
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import effective_sample_size, sample


def _built(algorithm, num_labels: int):
    """``algorithm`` set up for a stub policy: what ``_normalise`` reads is the label count (ContinuousTimePG
    also builds its value network from the sample shape and the number of training timesteps)."""
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    algorithm.setup(SimpleNamespace(num_labels=num_labels, sample_shape=(2,), scheduler=scheduler), None)
    return algorithm


def _leave_one_out(returns, groups):
    """Reference advantages ``[B, N]``, chain by chain: the return minus the mean of the OTHER chains of its group,
    of the other chains of the batch when it is alone in its group, and minus nothing when alone in the batch."""
    chains = torch.arange(len(returns))
    adv = torch.empty_like(returns)
    for i in range(len(returns)):
        others = (groups == groups[i]) & (chains != i)
        if not others.any():
            others = chains != i
        adv[i] = returns[i] - returns[others].mean(0) if others.any() else returns[i]
    return adv


# labels 0 (3 chains), 1 (2 chains), 2 (alone in its group) and the null label 3 (2 chains)
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3])


@pytest.mark.parametrize("per_condition", [False, True])
def test_advantage_is_return_minus_mean_of_the_other_chains(per_condition):
    returns = torch.randn(len(LABELS), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    algorithm = _built(PPO(per_condition=per_condition, advantage_clip=None), num_labels=3)
    groups = LABELS if per_condition else torch.zeros_like(LABELS)
    torch.testing.assert_close(
        algorithm._normalise(returns, LABELS), _leave_one_out(returns, groups), rtol=0, atol=1e-12
    )


def test_standardized_advantage_divides_the_leave_one_out_one_by_the_group_std():
    returns = torch.randn(len(LABELS), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    algorithm = _built(PPO(per_condition=True, advantages="standardize", advantage_clip=None), num_labels=3)
    # the chain alone in its group (label 2) takes the whole batch's baseline and std
    std = torch.stack([returns[LABELS == y].std(0) if (LABELS == y).sum() > 1 else returns.std(0) for y in LABELS])
    torch.testing.assert_close(
        algorithm._normalise(returns, LABELS), _leave_one_out(returns, LABELS) / std, rtol=1e-6, atol=0
    )  # the std has 1e-8 added


@pytest.mark.parametrize("algorithm", [PPO, ContinuousTimePG])
def test_per_chain_advantages_are_leave_one_out(algorithm):
    """Through the whole ``per_chain`` of each plugin (PPO's returns, ContinuousTimePG's temporal differences)."""
    policy, reward, trajectory = _raft_rollout()
    built = algorithm(alpha=0.5, per_condition=True, advantage_clip=None)
    built.setup(policy, reward)
    rewards = policy.score(reward, trajectory.samples, trajectory.labels)
    advantages = built.per_chain(trajectory, rewards, policy, reward)["advantages"]
    built._normalise = lambda returns, labels: returns  # the raw per-step returns or temporal differences
    raw = built.per_chain(trajectory, rewards, policy, reward)["advantages"]
    assert raw.std(0).min() > 0
    torch.testing.assert_close(advantages, _leave_one_out(raw.double(), trajectory.labels).float())


def test_a_chain_alone_in_the_batch_keeps_its_whole_return():
    """No other chain, hence no baseline that is independent of the chain's own sample: the baseline is 0."""
    returns = torch.tensor([[0.7, -1.5]], dtype=torch.float64)
    for per_condition in (False, True):
        algorithm = _built(PPO(per_condition=per_condition, advantage_clip=None), num_labels=3)
        torch.testing.assert_close(algorithm._normalise(returns, torch.tensor([2])), returns, rtol=0, atol=0)


def test_baselines_come_from_the_global_batch():
    """Under DDP each process holds part of the batch; the sums reduced over ranks give the same advantages."""
    returns = torch.randn(len(LABELS), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = _built(PPO(per_condition=True, advantage_clip=None), num_labels=3)._normalise(returns, LABELS)
    first, second = slice(0, 5), slice(5, None)
    other_rank = _built(PPO(per_condition=True, advantage_clip=None), num_labels=3)
    reduced = []
    other_rank.context.sum_over_ranks = lambda t: reduced.append(t) or t
    other_rank._normalise(returns[second], LABELS[second])
    this_rank = _built(PPO(per_condition=True, advantage_clip=None), num_labels=3)
    this_rank.context.sum_over_ranks = lambda t: t + reduced[0]
    torch.testing.assert_close(this_rank._normalise(returns[first], LABELS[first]), whole[first], rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", [PPO, ContinuousTimePG])
@pytest.mark.parametrize("n, per_condition", [(3, True), (4, False), (16, True)])
def test_score_function_gradient_is_unbiased(algorithm, n, per_condition):
    """A toy with a known score: each chain draws x ~ N(theta, 1), so grad_theta log p(x) = x - theta, and
    returns x^2, whose expectation has the exact gradient 2 theta. The columns of ``returns`` are independent
    draws (``_normalise`` centres each step on its own). The estimate ``mean_i A_i (x_i - theta)`` must average
    to 2 theta; centring by a mean that includes the chain itself gives (1 - 1/n) of it."""
    theta, draws = 0.5, 200_000
    labels = torch.tensor([0] * n + [1] * n) if per_condition else torch.zeros(n, dtype=torch.long)
    x = theta + torch.randn(len(labels), draws, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    returns, score = x.square(), x - theta
    exact = 2 * theta

    def estimate(advantages):
        return float((advantages * score).mean())

    built = _built(algorithm(per_condition=per_condition, advantage_clip=None), num_labels=2)
    groups = labels if per_condition else torch.zeros_like(labels)
    self_inclusive = returns - torch.stack([returns[groups == g].mean(0) for g in groups])
    assert estimate(returns) / exact == pytest.approx(1, abs=0.02)  # uncentred: unbiased, noisier
    assert estimate(self_inclusive) / exact == pytest.approx(1 - 1 / n, abs=0.02)  # the test can tell them apart
    assert estimate(built._normalise(returns, labels)) / exact == pytest.approx(1, abs=0.02)


def _raft_rollout():
    policy = AnalyticGaussian(dim=2)
    with torch.no_grad():  # a nonzero correction, so that the policy and the pretrained chain differ
        policy.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        policy.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        trajectory = sample(
            policy, torch.tensor([0, 0, 0, 0, 1, 1, 0, 0]), 4, 1.0, generator=torch.Generator().manual_seed(0)
        )
    return policy, GaussianLogLikelihood(y=[1.0, -0.5]), trajectory


def _gradient(policy, loss):
    policy.zero_grad()
    loss.backward()
    return torch.cat([policy.weight.grad.flatten(), policy.bias.grad.flatten()])


@pytest.mark.parametrize("per_condition", [False, True])
def test_raft_tilted_minibatches_average_to_the_rollout_fit(per_condition):
    """The tilted weights are normalised over the rollout; the minibatch losses of one epoch must average to the
    whole rollout's weighted fit (renormalising inside each minibatch would change which chains count most)."""
    policy, reward, trajectory = _raft_rollout()
    settings = dict(alpha=2.0, selection="tilted", per_condition=per_condition, timestep_fraction=1.0)
    full = RAFT(**settings)
    rewards = policy.score(reward, trajectory.samples, trajectory.labels)
    log_ratios = (trajectory.ref_log_probs - trajectory.log_probs).sum(1)
    weights = full._weights(rewards, log_ratios, full._groups(trajectory.labels))
    assert (weights > 0).all() and weights.max() > 2 * weights.min()  # unequal weights, every chain kept
    [batch] = full.updates(trajectory, policy, reward)
    expected = _gradient(policy, full.loss(batch, policy, reward)["loss"])

    torch.manual_seed(0)
    minibatches = list(RAFT(**settings, minibatch_size=2).updates(trajectory, policy, reward))
    assert len(minibatches) == 4
    average = sum(_gradient(policy, RAFT(**settings).loss(b, policy, reward)["loss"]) for b in minibatches) / 4
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_condition", [False, True])
def test_raft_top_minibatches_weigh_their_chains_equally(per_condition):
    """``selection: top`` keeps its meaning: each minibatch fits the mean over its kept chains."""
    policy, reward, trajectory = _raft_rollout()
    algorithm = RAFT(
        alpha=0.5,
        selection="top",
        keep_fraction=0.5,
        per_condition=per_condition,
        minibatch_size=3,
        timestep_fraction=1.0,
    )
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0]) if per_condition else trajectory.labels
    trajectory.labels = labels  # equal kept counts per group, hence equal weights
    minibatches = list(algorithm.updates(trajectory, policy, reward))
    assert [len(b.weights) for b in minibatches] == [3, 1]
    for b in minibatches:
        torch.testing.assert_close(b.weights, torch.full_like(b.weights, 1 / len(b.weights)))


@pytest.mark.parametrize("selection", ["tilted", "top"])
def test_raft_weights_on_two_processes_are_the_one_process_weights(selection):
    """Under DDP each of W processes holds b chains and gathers the rollout: its weights divided by W (DDP
    averages the processes' gradients) are its slice of the weights one process holding every chain gives, a
    label's chains on both processes being one group. Each process normalising alone gives other weights."""
    policy, reward, trajectory = _raft_rollout()
    trajectory.labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])  # each label on both processes
    rewards = policy.score(reward, trajectory.samples, trajectory.labels)
    finite = torch.ones(8, dtype=torch.bool)
    settings = dict(alpha=0.5, selection=selection, keep_fraction=0.25, timestep_fraction=1.0)
    one, ess, world = RAFT(**settings)._global_weights(trajectory, rewards, finite)
    assert world == 1 and int((one > 0).sum()) == (2 if selection == "top" else 8)  # top: the best of each label
    log_ratios = (trajectory.ref_log_probs - trajectory.log_probs).sum(1) if selection == "tilted" else None
    every = [trajectory.labels, rewards, finite, *([log_ratios] if log_ratios is not None else [torch.zeros(8)])]
    for rank in (0, 1):
        mine = torch.arange(8) // 4 == rank
        process = RAFT(**settings)

        def gather(t, rank=rank):  # the stacked [2, 4] of whichever rollout tensor this process passes
            [full] = [f for f in every if f.dtype == t.dtype and torch.equal(f[rank * 4 : rank * 4 + 4], t)][:1]
            return full.view(2, 4)

        process.context.gather, process.context.rank = gather, rank
        weights, ess_ddp, world = process._global_weights(trajectory.select(mine), rewards[mine], finite[mine])
        assert world == 2
        torch.testing.assert_close(weights / 2, one[mine])
        torch.testing.assert_close(ess_ddp, ess)
        alone, _, _ = RAFT(**settings)._global_weights(trajectory.select(mine), rewards[mine], finite[mine])
        assert not torch.allclose(alone / 2, one[mine])


def test_raft_effective_sample_size_counts_the_chains_that_carry_the_weight():
    """Kish's ESS per group: the number kept by "top"; every chain of a group under equal tilted weights; one
    chain when a reward gap of many nats (after dividing by alpha) puts the weight on it. Logged as ``ess``."""
    policy, reward, trajectory = _raft_rollout()
    trajectory.labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    top = RAFT(alpha=0.5, selection="top", keep_fraction=0.5, timestep_fraction=1.0)
    [batch] = top.updates(trajectory, policy, reward)
    assert float(batch.ess) == pytest.approx(2.0)
    assert float(top.loss(batch, policy, reward)["ess"]) == pytest.approx(2.0)

    tilted = RAFT(alpha=0.5, selection="tilted", timestep_fraction=1.0)
    groups = tilted._groups(trajectory.labels)
    equal = torch.full((8,), 0.125)
    assert [float(effective_sample_size(equal[g])) for g in groups] == pytest.approx([4.0, 4.0])
    rewards = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])  # 20 nats after alpha in label 0
    # path ratio exactly 1 (log-ratio 0): the weights are the rewards'
    weights = tilted._weights(rewards, torch.zeros(8), groups)
    per_label = [float(effective_sample_size(weights[g])) for g in groups]
    assert per_label[0] == pytest.approx(1.0, abs=1e-6) and per_label[1] == pytest.approx(4.0)
    rows = torch.tensor([[2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])  # unnormalised, along dim 1 as SMC asks
    assert effective_sample_size(rows, 1).tolist() == pytest.approx([4.0, 1.0])
