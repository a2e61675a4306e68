"""No network call that nothing uses: counted, not assumed. At alpha = 0 a rollout skips the pretrained model;
an update re-evaluating stored steps calls only the policy (the rollout's pretrained means are reused); the
KL can still be computed afterwards, equal to the one the sampler gives."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import randomize_lora
from torch.utils.data import DataLoader

from ctrl.algorithms import PPO, RAFT
from ctrl.classifier import ConvClassifier, save_classifier
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian, StableDiffusionPolicy, UNetPolicy
from ctrl.rewards import GaussianLogLikelihood
from ctrl.sampling import chain_kl, sample

STEPS = 4


class Counter:
    """Counts forward calls of a module (one batched call counts once)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _rollout(policy, pretrained: bool, labels=None, keep_means=False):
    labels = torch.tensor([0, 1]) if labels is None else labels
    generator = torch.Generator().manual_seed(0)
    return sample(policy, labels, STEPS, 1.0, generator=generator, pretrained=pretrained, keep_means=keep_means)


@pytest.fixture
def sd_policy(tiny_sd):
    policy = StableDiffusionPolicy(tiny_sd, prompts=["a cat", "a dog"], lora_rank=2)
    randomize_lora(policy.unet)
    return policy


def test_a_rollout_without_the_pretrained_model_makes_half_the_calls(sd_policy):
    counter = Counter(sd_policy.unet)
    full = _rollout(sd_policy, pretrained=True)
    with_pretrained, counter.calls = counter.calls, 0
    lean = _rollout(sd_policy, pretrained=False)
    assert (with_pretrained, counter.calls) == (2 * STEPS, STEPS)  # SD's grid: every step has noise
    torch.testing.assert_close(lean.latents, full.latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lean.log_probs, full.log_probs, atol=1e-3, rtol=1e-4)
    assert lean.kl is None and lean.ref_log_probs is None and lean.pre_means is None
    # the KL computed afterwards, without gradients, is the sampler's
    torch.testing.assert_close(chain_kl(sd_policy, lean), full.kl, atol=1e-4, rtol=1e-3)


def test_a_rollout_that_kept_its_means_needs_only_the_pretrained_call_for_its_kl(sd_policy):
    full = _rollout(sd_policy, pretrained=True)
    lean = _rollout(sd_policy, pretrained=False, keep_means=True)
    assert lean.means.shape == lean.latents[:, 1:].shape and not lean.means.requires_grad
    counter = Counter(sd_policy.unet)
    kl = chain_kl(sd_policy, lean)
    assert counter.calls == STEPS  # the pretrained model's only; recomputing both would take 2 * STEPS
    assert float(full.kl.abs().min()) > 0  # a LoRA that moved: the equality below is not 0 = 0
    torch.testing.assert_close(kl, full.kl, atol=1e-4, rtol=1e-3)


def test_a_unet_lora_policy_kl_from_kept_means_needs_only_the_pretrained_call(tiny_pretrained):
    policy = UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    randomize_lora(policy.unet)
    full = _rollout(policy, pretrained=True)
    lean = _rollout(policy, pretrained=False, keep_means=True)
    counter = Counter(policy.unet)
    kl = chain_kl(policy, lean)
    assert counter.calls == len(lean.stochastic_steps)  # one call per stochastic step, not two
    assert float(full.kl.sum()) > 0 and all(p.requires_grad for n, p in policy.unet.named_parameters() if "lora_" in n)
    torch.testing.assert_close(kl, full.kl, atol=1e-4, rtol=1e-3)


def test_the_null_label_still_needs_the_pretrained_model(sd_policy):
    counter = Counter(sd_policy.unet)
    _rollout(sd_policy, pretrained=False, labels=torch.tensor([0, sd_policy.null_label]))
    assert counter.calls == 2 * STEPS


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ppo_updates_call_only_the_policy(alpha, sd_policy):
    algorithm = PPO(alpha=alpha, minibatch_size=2)
    algorithm.setup(sd_policy, None)
    trajectory = _rollout(sd_policy, pretrained=algorithm.needs_pretrained)
    assert (trajectory.pre_means is not None) == (alpha > 0)
    rewards = torch.tensor([1.0, -1.0])
    [batch] = list(algorithm._minibatches(trajectory, rewards, **algorithm.per_chain(trajectory, rewards, None, None)))
    counter = Counter(sd_policy.unet)
    out = algorithm.loss(batch, sd_policy, None)
    assert counter.calls == len(batch.steps) == STEPS
    assert ("kl" in out) == (alpha > 0)
    out["loss"].backward()


def test_tilted_raft_reuses_the_rollout_pretrained_means(tiny_pretrained):
    policy = UNetPolicy(tiny_pretrained, num_labels=2, label_embedding=False, lora_rank=2)
    algorithm = RAFT(alpha=0.5, selection="tilted")
    algorithm.setup(policy, GaussianLogLikelihood(y=[0.0]))
    trajectory = _rollout(policy, pretrained=True)
    [batch] = list(algorithm.updates(trajectory, policy, lambda x0, labels: -x0.flatten(1).square().mean(1)))
    counter = Counter(policy.unet)
    algorithm.loss(batch, policy, None)
    assert counter.calls == len(batch.steps)


def test_the_logged_kl_at_alpha_0_is_the_rollouts_exact_kl():
    """``model.kl_log_interval`` 1 at alpha 0: ``train/kl`` of the first rollout is the KL the sampler gives when it
    evaluates the pretrained model beside the policy, for the same chains, before any update."""
    policy = AnalyticGaussian(dim=2, mean=[1.0, -0.5], std=0.8, num_buckets=STEPS, num_labels=2)
    with torch.no_grad():  # a policy away from the pretrained one: its KL is not 0
        policy.weight.normal_(generator=torch.Generator().manual_seed(1)).mul_(0.3)
        policy.bias.normal_(generator=torch.Generator().manual_seed(2)).mul_(0.3)
    reward = GaussianLogLikelihood(y=[2.0, 1.0])
    module = ControlModule(policy, reward, PPO(alpha=0.0), num_steps=STEPS, kl_log_interval=1)
    labels, seeds = torch.tensor([0, 1, 0, 1]), torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        noise = module._fixed_noise(seeds, STEPS)
        expected = sample(policy, labels, STEPS, module.eta, noise=noise, pretrained=True).kl.sum(1).mean()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader([(labels, seeds)], batch_size=None))
    assert float(expected) > 1e-3
    torch.testing.assert_close(trainer.callback_metrics["train/kl"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["PPO", "DirectBackprop"])
def test_the_sd15_speed_harness_makes_the_modules_network_calls(name, tiny_sd, tmp_path, monkeypatch):
    """benchmarks/sd15_speed.py times a training step without a Trainer: it must make the calls (and forward
    passes under checkpointing) that ``ControlModule``'s own training step makes for the same plugin, or its
    figures describe something ctrl does not run. The module's KL-logging rollout (at alpha 0, one in
    ``kl_log_interval``) is off on both sides: the harness times the rollouts between two of them."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sd15_speed

    clf = tmp_path / "clf.safetensors"
    save_classifier(ConvClassifier(num_labels=4, channels=3, width=8), 1.0, clf)
    labels = torch.tensor([0, 1])
    calls = []
    for harness in (True, False):
        module, optimizer = sd15_speed.build(name, tiny_sd, clf, "float32", STEPS, torch.device("cpu"))
        module.kl_log_interval = None
        counter = Counter(module.policy.unet)
        if harness:
            sd15_speed.training_step(module, optimizer, labels, STEPS)
        else:
            trainer = L.Trainer(
                accelerator="cpu",
                max_steps=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
            )
            trainer.fit(module, DataLoader([(labels, torch.tensor([3, 4]))], batch_size=None))
        calls.append(counter.calls)
    assert calls[0] == calls[1] > 0, calls
