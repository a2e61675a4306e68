"""The one sampler against diffusers' DDIM step, and the exactness of the KL and of its gradient."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from ctrl.policy import UNetPolicy
from ctrl.sampling import gaussian_kl, gaussian_log_prob, make_grid, sample, step_mean


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_mean_and_std_match_diffusers_ddim(clip, eta):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, timestep_spacing="trailing")
    grid = make_grid(sched, 10, eta)
    torch.manual_seed(0)
    x, eps, z = torch.randn(3, 4, 1, 8, 8)
    for k in range(9):  # every stochastic step
        t = int(grid.timesteps[k])
        ours = step_mean(
            x,
            eps,
            float(grid.alpha_prod[k]),
            float(grid.alpha_prod_prev[k]),
            float(grid.sigma[k]),
            1.0 if clip else None,
        )
        ref_mean = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ref_noisy = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, ref_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours + float(grid.sigma[k]) * z, ref_noisy, atol=1e-5, rtol=1e-5)
    assert float(grid.sigma[-1]) == 0.0  # the last step ends at alpha_prod = 1: deterministic


def test_log_prob_is_summed_gaussian_density():
    torch.manual_seed(0)
    x, mean = torch.randn(2, 5, 1, 4, 4)
    ref = torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3), ref)
    # the KL of equal-variance Gaussians
    ref_kl = (
        torch.distributions.kl_divergence(torch.distributions.Normal(x, 0.3), torch.distributions.Normal(mean, 0.3))
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(gaussian_kl(x, mean, 0.3), ref_kl)


def _policy(tiny_pretrained, **kw):
    torch.manual_seed(0)
    kw.setdefault("label_embedding", True)
    return UNetPolicy(tiny_pretrained, num_labels=3, **kw)


def _perturb(policy, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for group in policy.param_groups():
            for p in group["params"]:
                p.add_(scale * torch.randn_like(p))
        if policy.label_embedding:  # the null row never trains (test_null_label_row_never_trains)
            policy.unet.class_embedding.weight[policy.null_label].zero_()


def test_null_label_row_never_trains(tiny_pretrained):
    policy = _policy(tiny_pretrained)
    opt = torch.optim.AdamW([p for g in policy.param_groups() for p in g["params"]], lr=0.1, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 3])  # 3 is the null label
    for _ in range(2):
        opt.zero_grad()
        sample(policy, labels, 3, 1.0, grad_steps=3).samples.square().sum().backward()
        opt.step()
    weight = policy.unet.class_embedding.weight
    assert weight[:3].abs().sum() > 0 and weight[3].abs().sum() == 0


@pytest.mark.parametrize(
    "parts", [dict(), dict(step_bias=True, residual_head=True, label_embedding=False), dict(lora_rank=2)]
)
def test_kl_zero_at_init_and_positive_after_change(tiny_pretrained, parts):
    policy = _policy(tiny_pretrained, **parts)
    labels = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = sample(policy, labels, 5, 1.0, noise=noise)
        pre = sample(policy, torch.full_like(labels, policy.null_label), 5, 1.0, noise=noise)
    assert before.kl.abs().max() == 0
    torch.testing.assert_close(before.samples, pre.samples)  # zero-initialised control = pretrained model
    _perturb(policy)
    with torch.no_grad():
        after = sample(policy, labels, 5, 1.0, noise=noise)
        null_after = sample(policy, torch.full_like(labels, policy.null_label), 5, 1.0, noise=noise)
        gamma0 = sample(policy, labels, 5, 1.0, noise=noise, control_scale=0.0)
    assert (after.kl[:, :-1] > 0).all()
    assert after.kl[:, -1].abs().max() == 0  # the deterministic last step carries no control
    torch.testing.assert_close(null_after.samples, pre.samples)  # the null label stays pretrained
    torch.testing.assert_close(gamma0.samples, pre.samples)  # guidance 0 is the pretrained model


def _objective(policy, labels, noise, grad_steps, checkpointing):
    traj = sample(policy, labels, 5, 1.0, noise=noise, grad_steps=grad_steps, gradient_checkpointing=checkpointing)
    return (traj.samples.square().mean(dim=(1, 2, 3)) - 0.3 * traj.kl.sum(1)).sum()


@pytest.mark.parametrize("grad_steps", [5, 2])
def test_checkpointed_truncated_gradients_equal_plain_autograd(tiny_pretrained, grad_steps):
    policy = _policy(tiny_pretrained, step_bias=True, residual_head=True, lora_rank=2)
    _perturb(policy)
    labels = torch.tensor([0, 2, 1])
    noise = torch.randn(3, 6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    params = [p for g in policy.param_groups() for p in g["params"]]
    plain = torch.autograd.grad(_objective(policy, labels, noise, grad_steps, False), params, allow_unused=True)
    ckpt = torch.autograd.grad(_objective(policy, labels, noise, grad_steps, True), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_truncation_cuts_the_gradient_of_early_steps(tiny_pretrained):
    """With grad_steps=1 the bias of early timestep buckets receives no gradient; with all steps it does."""
    policy = _policy(tiny_pretrained, step_bias=True, label_embedding=False, num_buckets=5)
    labels = torch.tensor([0, 1])
    noise = torch.randn(2, 6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, early_nonzero in ((5, True), (2, False)):
        policy.zero_grad()
        _objective(policy, labels, noise, steps, False).backward()
        early = policy.step_bias.grad[:, 4]  # bucket of the first (noisiest) step
        assert bool(early.abs().sum() > 0) == early_nonzero


def test_kl_gradient_is_exact(tiny_pretrained):
    """The KL's gradient includes the path through x_t into the pretrained mean (finite differences).

    Computing eps_pre under no_grad keeps the KL's value and silently breaks its gradient
    (docs/digits-study.md); a central difference of the whole chain's KL catches that.
    """
    policy = _policy(tiny_pretrained, step_bias=True, residual_head=True, label_embedding=False).double()
    _perturb(policy, 0.2)
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 6, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weight = policy.head.out.weight
    direction = torch.randn_like(weight)

    def kl_sum():
        return sample(policy, labels, 5, 1.0, noise=noise, grad_steps=5).kl.sum()

    (grad,) = torch.autograd.grad(kl_sum(), weight)
    h = 1e-4
    with torch.no_grad():
        weight.add_(h * direction)
        plus = kl_sum()
        weight.sub_(2 * h * direction)
        minus = kl_sum()
        weight.add_(h * direction)
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum()
    assert torch.isclose(analytic, numeric, rtol=1e-4), (analytic, numeric)


def test_fixed_noise_gives_fixed_samples(tiny_pretrained):
    policy = _policy(tiny_pretrained)
    labels = torch.tensor([0, 1])
    a = sample(policy, labels, 4, 1.0, generator=torch.Generator().manual_seed(0))
    b = sample(policy, labels, 4, 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.latents, b.latents)
    assert a.latents.shape == (2, 5, 1, 8, 8) and a.log_probs.shape == (2, 4) and a.kl.shape == (2, 4)
