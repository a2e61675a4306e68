"""Gradient accumulation (``model.accumulate``): N rollouts of B chains make the optimizer step of one rollout of
N*B chains, the learning-rate scheduler and ``global_step`` count optimizer steps, and a checkpoint written between
two steps resumes exactly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import assert_same
from torch.utils.data import DataLoader

from ctrl.algorithms import PPO, DirectBackprop
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import GaussianLogLikelihood
from ctrl.seeds import chain_seed

STEPS = 4
# Two chains per condition, a condition's two chains always in the same rollout: PPO's per-condition baselines
# are then the same whether 8 chains come as two rollouts of 4 or as one of 8.
LABELS = [0, 0, 1, 1, 2, 2, 3, 3]


def _batches(groups: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``groups`` times the 8 chains of LABELS (each with its own noise seed), as rollouts of ``size`` chains."""
    labels = torch.tensor(LABELS * groups)
    seeds = torch.tensor([chain_seed(0, 0, i) for i in range(len(labels))])
    return list(zip(labels.split(size), seeds.split(size)))


def _module(algorithm, accumulate: int) -> ControlModule:
    # SGD, no clipping: the update is the gradient itself, so a wrongly scaled gradient shows (Adam's first
    # step would hide a factor of 2); the scheduler halves the rate at each of its steps.
    return ControlModule(
        AnalyticGaussian(dim=2, mean=[1.0, -0.5], std=0.8, num_buckets=STEPS, lr=0.01, num_labels=4),
        GaussianLogLikelihood(y=[2.0, 1.0]),
        algorithm,
        num_steps=STEPS,
        accumulate=accumulate,
        max_grad_norm=None,
        kl_log_interval=None,
        optimizer=lambda groups: torch.optim.SGD(groups),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )


def _fit(module, batches, epochs: int = 1, ckpt_path=None) -> L.Trainer:
    """Train on ``batches`` each epoch, validating after each (Lightning frees the gradients before validating:
    an unfinished accumulation group must survive that)."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    validation = DataLoader([(torch.tensor([0, 1]), torch.tensor([0, 1]))], batch_size=None)  # validation seeds
    trainer.fit(module, DataLoader(batches, batch_size=None), validation, ckpt_path=ckpt_path)
    return trainer


def _weights(module) -> dict[str, torch.Tensor]:
    return {"weight": module.policy.weight.detach().clone(), "bias": module.policy.bias.detach().clone()}


ALGORITHMS = {
    "DirectBackprop": lambda: DirectBackprop(alpha=0.2),
    "PPO": lambda: PPO(alpha=0.2, clip_range=0.05, advantages="standardize", per_condition=True),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_rollouts_accumulated_are_one_rollout_twice_as_large(name):
    """accumulate 2 on 4 rollouts of 4 chains = accumulate 1 on 2 rollouts of the same 8 chains each: the same
    parameters after 2 optimizer steps, 2 scheduler steps (the second step runs at half the rate), global_step 2."""
    accumulated, large = _module(ALGORITHMS[name](), 2), _module(ALGORITHMS[name](), 1)
    trainers = _fit(accumulated, _batches(2, 4)), _fit(large, _batches(2, 8))
    for trainer in trainers:
        assert trainer.global_step == 2
        assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    weights = _weights(accumulated)
    assert weights["bias"].abs().max() > 1e-2  # training moved the control
    assert_same(weights, _weights(large), atol=1e-5)

    # without accumulation the same 4 rollouts of 4 take 4 steps and end elsewhere: the comparison above is sharp
    plain = _module(ALGORITHMS[name](), 1)
    assert _fit(plain, _batches(2, 4)).global_step == 4
    assert (weights["bias"] - _weights(plain)["bias"]).abs().max() > 1e-3


# (algorithm, accumulate): one update per rollout; and two minibatches per rollout in groups of 4 updates, which
# straddle rollouts (3 rollouts: 6 updates, 1 step and 2 updates' gradients pending)
RESUMED = {
    "DirectBackprop": (lambda: DirectBackprop(alpha=0.2), 2),
    "PPO minibatches": (lambda: PPO(alpha=0.2, clip_range=0.05, minibatch_size=2), 4),
}


@pytest.mark.parametrize("name", RESUMED)
def test_a_checkpoint_between_optimizer_steps_resumes_exactly(name, tmp_path):
    """An epoch of 3 rollouts ends inside an accumulation group: its checkpoint holds the gradients gathered so
    far, and the run resumed from it for a second epoch ends where the uninterrupted two-epoch run does."""
    make, accumulate = RESUMED[name]
    batches = _batches(2, 4)[:3]
    whole = _module(make(), accumulate)
    _fit(whole, batches, epochs=2)

    cut = _module(make(), accumulate)
    trainer = _fit(cut, batches, epochs=1)
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    saved = torch.load(tmp_path / "cut.ckpt", weights_only=True)["ctrl"]["accumulation"]
    assert saved["updates"] > 0 and saved["grads"] and saved["rollouts"] == 3 % accumulate
    resumed = _module(make(), accumulate)
    _fit(resumed, batches, epochs=2, ckpt_path=tmp_path / "cut.ckpt")
    assert_same(_weights(whole), _weights(resumed), atol=1e-6)
    assert_same(whole.optimizers().optimizer.state_dict(), resumed.optimizers().optimizer.state_dict(), atol=1e-6)

    # the pending gradients are what makes it exact: resumed without them, the run ends elsewhere
    checkpoint = torch.load(tmp_path / "cut.ckpt", weights_only=True)
    checkpoint["ctrl"]["accumulation"]["grads"] = {}
    torch.save(checkpoint, tmp_path / "no-grads.ckpt")
    without = _module(make(), accumulate)
    _fit(without, batches, epochs=2, ckpt_path=tmp_path / "no-grads.ckpt")
    assert (_weights(whole)["bias"] - _weights(without)["bias"]).abs().max() > 1e-4


def test_accumulate_below_one_is_refused():
    with pytest.raises(ValueError, match=r"^ControlModule\.accumulate: must be >= 1 .*got 0"):
        _module(DirectBackprop(), 0)
