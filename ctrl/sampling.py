"""The one sampler: a timestep grid, a Gaussian step with its log-probability and KL, a Trajectory.

Every algorithm, every evaluation and `ctrl predict` draw samples through :func:`sample`. A step of the
chain is ``x_{k-1} = mu(x_k, out) + sigma_k * z``, where ``out`` is the network's prediction and the grid
(:func:`make_grid`, from the policy's diffusers scheduler) says what it predicts and how a step uses it.

**DDPM/DDIM** (:class:`DDIMGrid`; noise prediction eps; Song et al. 2021, eq. 12):

    x0_hat = (x_k - sqrt(1 - a_k) * eps) / sqrt(a_k)                 (clipped if the scheduler clips)
    sigma_k = eta * sqrt((1 - a_prev) / (1 - a_k) * (1 - a_k / a_prev))
    mu     = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_k^2) * eps

with ``a = alphas_cumprod``. ``eta = 1`` on the full grid is ancestral DDPM sampling (the DDPM
posterior variance), so DDPM needs no separate code path.

**Flow matching** (:class:`FlowGrid`; velocity prediction v, rectified flow ``x_t = (1 - t) x_0 + t z``, as
diffusers' ``FlowMatchEulerDiscreteScheduler`` and Stable Diffusion 3 use it). The Euler step of the ODE
``dx = v dt`` from t to t' < t is ``x + (t' - t) v``. Adding noise while keeping every marginal p_t needs the
score, which a velocity model gives: ``grad log p_t(x) = -(x + (1 - t) v) / t``. The reverse-time SDE with
diffusion ``s_t`` then has drift ``v + s_t^2 / (2t) (x + (1 - t) v)`` (as Flow-GRPO, Liu et al. 2025, samples),
and its Euler-Maruyama step is

    mu      = x + (t' - t) * (v + s_t^2 / (2t) * (x + (1 - t) v)),     sigma_k = s_t * sqrt(t - t')
    s_t     = eta * sqrt(t / (1 - t))        (at t = 1, 1 - t is read at the grid's second point, as Flow-GRPO)

``eta`` (>= 0; Flow-GRPO's noise level, 0.7 there) sets how much noise; 0 is the plain Euler ODE.

Both kinds end the same way: the last step (to ``a_prev = 1``, or to t' = 0) is deterministic (``sigma = 0``)
and lands on the model's estimate of x_0. It has no density, so the policy's control is switched off there
(log-prob and KL of that step are 0).

Log-probabilities are SUMMED over pixels (an average would make a PPO clip range depend on the
image size). The per-step KL to the pretrained chain is exact for two Gaussians of equal variance:
``||mu_theta - mu_pre||^2 / (2 sigma_k^2)``, also summed over pixels.

``eta = 0`` is deterministic sampling (DDIM, or the flow's Euler ODE), the chain AlignProp and DRaFT
backpropagate through: no step has a density (no log-probability, no KL), and the control acts on every
step, the last included (:attr:`StepGrid.deterministic`). Only a pathwise gradient (DirectBackprop at
alpha 0) can train it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Trajectory",
    "StepGrid",
    "DDIMGrid",
    "FlowGrid",
    "is_flow_scheduler",
    "GradientPlan",
    "make_grid",
    "predict_x0",
    "step_from_x0",
    "step_mean",
    "step_means",
    "gaussian_log_prob",
    "gaussian_kl",
    "sample",
]


@dataclass
class Trajectory:
    """One batch of sampled chains.

    Attributes:
        latents: ``[B, N+1, C, H, W]``; ``latents[:, 0]`` is the noise x_T, ``latents[:, -1]`` the sample x_0.
        log_probs: ``[B, N]``; log pi(x_{k-1} | x_k) of the policy that sampled, summed over pixels.
        kl: ``[B, N]``; exact KL of each step of the sampling policy to the pretrained chain.
        ref_log_probs: ``[B, N]``; log p_pre(x_{k-1} | x_k) of the same steps under the pretrained
            chain, so ``sum(ref_log_probs - log_probs)`` is the log density ratio of a whole path.
        pre_means: ``[B, N, C, H, W]``; the pretrained model's mean of each step at the stored x_k (no
            gradient), so that an update re-evaluating a stored step needs only the policy's call.
        kl, ref_log_probs and pre_means are None for a rollout sampled without the pretrained model.
        means: ``[B, N, C, H, W]``; the sampling policy's mean of each step (no gradient, at the sampler's control
            scale), kept only when asked (``keep_means``): with it, :func:`chain_kl` needs only the pretrained call.
        labels: ``[B]``; the condition (label index) of each chain.
        grid: the step coefficients (:class:`StepGrid`: timesteps ``[N]`` from noise to data, sigmas), so that
            an algorithm can re-evaluate any stored step with :func:`step_means`.
    """

    latents: Tensor
    log_probs: Tensor
    kl: Tensor | None
    ref_log_probs: Tensor | None
    labels: Tensor
    grid: StepGrid
    pre_means: Tensor | None = None
    means: Tensor | None = None

    @property
    def timesteps(self) -> Tensor:
        return self.grid.timesteps

    @property
    def samples(self) -> Tensor:
        """The final samples x_0, ``[B, C, H, W]``."""
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with sigma > 0: those with a log-probability (all but a deterministic last)."""
        return [k for k, s in enumerate(self.grid.sigma.tolist()) if s > 0]

    def select(self, index: Tensor) -> Trajectory:
        """The chains picked by ``index`` (a boolean mask or indices over B)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Trajectory(
            self.latents[index],
            self.log_probs[index],
            pick(self.kl),
            pick(self.ref_log_probs),
            self.labels[index],
            self.grid,
            pick(self.pre_means),
            pick(self.means),
        )

    def kl_to_go(self) -> Tensor:
        """``[B, N]``: the KL of the steps AFTER each step, sum_{j>k} KL_j (what step k's action influences)."""
        if self.kl is None:
            raise ValueError("this rollout was sampled without the pretrained model: it has no KL.")
        return self.kl.flip(1).cumsum(1).flip(1) - self.kl


class StepGrid:
    """Coefficients of an N-step grid from noise to data (float32 throughout): :class:`DDIMGrid` or :class:`FlowGrid`.

    Attributes every grid has:
        timesteps: ``[N]`` the network's timestep input at each step, in sampling order.
        sigma: ``[N]`` the standard deviation of each step's noise (0: a deterministic step).
        deterministic: the grid of eta = 0, where the control acts on every step; otherwise it acts on the
            steps with noise only (:meth:`controlled`).
    """

    timesteps: Tensor
    sigma: Tensor
    deterministic: bool

    def controlled(self, k: int) -> bool:
        """Whether the policy's control acts on step k: a step with noise (sigma > 0), or any step of a
        deterministic chain. A deterministic step of a stochastic chain has no density and an infinite KL."""
        return self.deterministic or float(self.sigma[k]) > 0

    @property
    def controlled_steps(self) -> list[int]:
        """Indices of the steps the control acts on (those a gradient window counts), in sampling order."""
        return [k for k in range(len(self.sigma)) if self.controlled(k)]

    def step_mean(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        """Mean of step k from ``x`` (= x_k) given the network's prediction ``out``, both ``[B, ...]``."""
        raise NotImplementedError

    def predict_x0(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        """The model's estimate of x_0 (Tweedie's) from ``x`` at step k and its prediction ``out``, ``[B, ...]``."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, k: int) -> Tensor:
        """x_t of step k from data ``x0`` and standard normal ``noise`` by the forward process, ``[B, ...]``."""
        raise NotImplementedError

    def true_prediction(self, x0: Tensor, noise: Tensor) -> Tensor:
        """What a perfect network predicts at :meth:`add_noise`'s x_t given the ``x0`` and ``noise`` it came from
        (the denoising regression target), ``[B, ...]``."""
        raise NotImplementedError


@dataclass
class DDIMGrid(StepGrid):
    """A DDPM/DDIM grid (eps prediction): ``alpha_prod`` and ``alpha_prod_prev`` ``[N]``, the cumulative alphas at
    each step and at the one it steps to (module docstring)."""

    timesteps: Tensor
    alpha_prod: Tensor
    alpha_prod_prev: Tensor
    sigma: Tensor
    deterministic: bool = False

    def step_mean(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        a, a_prev, s = float(self.alpha_prod[k]), float(self.alpha_prod_prev[k]), float(self.sigma[k])
        return step_mean(x, out, a, a_prev, s, clip_range)

    def predict_x0(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        return predict_x0(x, out, float(self.alpha_prod[k]), clip_range)

    def add_noise(self, x0: Tensor, noise: Tensor, k: int) -> Tensor:
        a = float(self.alpha_prod[k])
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise

    def true_prediction(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise


@dataclass
class FlowGrid(StepGrid):
    """A flow-matching grid (velocity prediction): ``t`` and ``t_prev`` ``[N]``, the noise level of the
    interpolation ``x_t = (1 - t) x_0 + t z`` at each step and at the one it steps to, and ``noise`` ``[N]``, the
    SDE's diffusion s_t of each step (0 on a deterministic step; module docstring)."""

    timesteps: Tensor
    t: Tensor
    t_prev: Tensor
    noise: Tensor
    sigma: Tensor
    deterministic: bool = False

    def step_mean(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        t, dt, s = float(self.t[k]), float(self.t_prev[k] - self.t[k]), float(self.noise[k])
        c = s * s / (2 * t)
        return (1 + c * dt) * x + dt * (1 + c * (1 - t)) * out

    def predict_x0(self, x: Tensor, out: Tensor, k: int, clip_range: float | None = None) -> Tensor:
        x0_hat = x - float(self.t[k]) * out
        return x0_hat if clip_range is None else x0_hat.clamp(-clip_range, clip_range)

    def add_noise(self, x0: Tensor, noise: Tensor, k: int) -> Tensor:
        t = float(self.t[k])
        return (1 - t) * x0 + t * noise

    def true_prediction(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0


@dataclass(frozen=True)
class GradientPlan:
    """Which steps of a training rollout carry gradients (what an algorithm asks of :func:`sample`).

    Attributes:
        steps: K, how many of the LAST controlled steps (:meth:`StepGrid.controlled`: the stochastic ones, or
            every step of a deterministic chain) are differentiated through (the window; a deterministic
            step after them rides along, it has no control). 0: none.
        weights: ``[S]`` multiplier of the parameter gradient of each controlled step in the window, in
            sampling order (None: 1). Random truncation uses 1 / P(step in the window), so that the
            expected gradient is the whole chain's.
        kl_steps: the first ``kl_steps`` steps, when outside the window, still give their KL's direct
            gradient (the policy's mean at the detached state), so that a truncated chain's early steps
            stay regularised toward the pretrained chain instead of drifting unpenalised.
    """

    steps: int = 0
    weights: Tensor | None = None
    kl_steps: int = 0


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (velocity prediction; diffusers' ``FlowMatch*`` schedulers)
    rather than a DDPM/DDIM one (noise prediction, ``alphas_cumprod``)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def make_grid(scheduler, num_steps: int, eta: float) -> StepGrid:
    """The timestep grid of ``scheduler`` with N steps: a :class:`FlowGrid` for a flow-matching scheduler, else a
    :class:`DDIMGrid` (a diffusers DDIM/DDPM scheduler).

    The grid itself (leading/trailing spacing, offsets, a flow model's shift) is the scheduler's own
    ``set_timesteps``. ``eta``: DDIM's in [0, 1]; a flow grid's noise level, >= 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if is_flow_scheduler(scheduler):
        return _flow_grid(scheduler, num_steps, eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long()
    acp = scheduler.alphas_cumprod.float()
    stride = scheduler.config.num_train_timesteps // num_steps
    prev = timesteps - stride
    final = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
    alpha_prod = acp[timesteps]
    alpha_prod_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], torch.full_like(alpha_prod, final))
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prod_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    return DDIMGrid(timesteps, alpha_prod, alpha_prod_prev, sigma, deterministic=eta == 0)


def _flow_grid(scheduler, num_steps: int, eta: float) -> FlowGrid:
    """:func:`make_grid` of a flow-matching scheduler (module docstring)."""
    if eta < 0:
        raise ValueError(f"the noise level eta of a flow-matching sampler must be >= 0 (0: the Euler ODE), got {eta}")
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError(
            "this flow-matching scheduler shifts its grid by the image size (use_dynamic_shifting, as Flux's does); "
            "ctrl's sampler takes schedulers with a fixed shift (Stable Diffusion 3)"
        )
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.float().cpu()
    t, t_prev = sigmas[:-1], sigmas[1:]
    # s_t = eta sqrt(t / (1 - t)) is infinite at t = 1: there 1 - t is read at the grid's second point
    second = t[1] if num_steps > 1 else t[0].new_zeros(())
    noise = eta * (t / (1 - torch.where(t >= 1, second, t))).sqrt()
    noise = torch.where(t_prev > 0, noise, torch.zeros_like(noise))  # the last step: the ODE's, onto x0_hat
    sigma = noise * (t - t_prev).clamp(min=0).sqrt()
    return FlowGrid(scheduler.timesteps.float().cpu(), t, t_prev, noise, sigma, deterministic=eta == 0)


def predict_x0(x: Tensor, eps: Tensor, alpha_prod: float, clip_range: float | None = None) -> Tensor:
    """Tweedie's estimate of x_0 from x_t and the predicted noise: ``(x - sqrt(1 - a) eps) / sqrt(a)``."""
    x0_hat = (x - math.sqrt(1 - alpha_prod) * eps) / math.sqrt(alpha_prod)
    return x0_hat if clip_range is None else x0_hat.clamp(-clip_range, clip_range)


def step_from_x0(x0_hat: Tensor, eps: Tensor, alpha_prod_prev: float, sigma: float) -> Tensor:
    """Mean of a DDIM step given its x0 estimate and noise: ``sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps``."""
    return math.sqrt(alpha_prod_prev) * x0_hat + math.sqrt(max(1 - alpha_prod_prev - sigma**2, 0.0)) * eps


def step_mean(
    x: Tensor, eps: Tensor, alpha_prod: float, alpha_prod_prev: float, sigma: float, clip_range: float | None = None
) -> Tensor:
    """Mean of one DDIM step (module docstring), ``[B, C, H, W]``; matches diffusers' DDIMScheduler.step."""
    return step_from_x0(predict_x0(x, eps, alpha_prod, clip_range), eps, alpha_prod_prev, sigma)


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """log N(x; mean, sigma^2 I) summed over all but the batch dimension, ``[B]``."""
    d = x[0].numel()
    sq = (x - mean).flatten(1).pow(2).sum(1)
    return -sq / (2 * sigma**2) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def gaussian_kl(mean: Tensor, mean_ref: Tensor, sigma: float) -> Tensor:
    """KL(N(mean, s^2 I) || N(mean_ref, s^2 I)) = ||mean - mean_ref||^2 / (2 s^2), summed per sample, ``[B]``.

    The one KL of the library. Gradients flow through BOTH means: when x_k depends on theta, the
    reference mean does too, and cutting that path silently breaks the KL's gradient.
    """
    return (mean - mean_ref).flatten(1).pow(2).sum(1) / (2 * sigma**2)


def effective_sample_size(weights: Tensor, dim: int = -1) -> Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of non-negative ``weights`` along ``dim`` (the
    weights need not be normalised): ``weights.shape`` without ``dim``. The one ESS of the library: SMC resamples
    on it, RAFT logs it."""
    return weights.sum(dim).square() / weights.square().sum(dim)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def step_means(
    policy,
    x: Tensor,
    grid: StepGrid,
    k: int | list[int],
    labels: Tensor,
    control_scale: float = 1.0,
    gradient_checkpointing: bool = False,
    grad_weight: float = 1.0,
    pretrained: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Means of step k from x (= x_k) under the policy and under the pretrained model, each like ``x``
    (``pretrained=False``: the pretrained mean is not needed, and is None when the policy can skip its call).

    ``k`` a list of G stochastic steps: ``x`` and ``labels`` hold G equal blocks of samples, block j at step
    ``k[j]``, and all of them go through ONE network call (with a timestep per sample; a larger batch costs
    less per sample than many small ones). Each block's mean uses its own step's coefficients, exactly as
    a call for that step alone would.

    The one place where a step's network call happens (sampling and every algorithm's re-evaluation
    of a stored step). Control is switched off on a deterministic step (sigma = 0) of a stochastic chain:
    it has no density and an infinite KL (:meth:`StepGrid.controlled`; a deterministic chain, eta = 0, is
    controlled on every step). ``grad_weight`` w multiplies the gradient that reaches the
    parameters through this call and nothing else: the input's gradient is scaled by 1/w and the
    outputs' by w, so a gradient passing through to x is unchanged.
    """
    if isinstance(k, list):
        return _blocks_means(policy, x, grid, k, labels, control_scale, gradient_checkpointing, pretrained)
    t = grid.timesteps[k].to(x.device)
    g = control_scale if grid.controlled(k) else 0.0
    weighted = grad_weight != 1.0 and torch.is_grad_enabled()
    if weighted:
        x = _ScaleGrad.apply(x, 1.0 / grad_weight)
    mean, mean_pre = _network_means(policy, x, t, labels, g, pretrained, grid, [k], gradient_checkpointing)
    if weighted:
        mean = _ScaleGrad.apply(mean, grad_weight)
        mean_pre = None if mean_pre is None else _ScaleGrad.apply(mean_pre, grad_weight)
    return mean, mean_pre


def _network_means(
    policy,
    x: Tensor,
    t: Tensor,
    labels: Tensor,
    g: float,
    pretrained: bool,
    grid: StepGrid,
    ks: list[int],
    checkpointing: bool,
) -> tuple[Tensor, Tensor | None]:
    """One network call and the means of the steps in it (:func:`_means`), checkpointed when asked."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(_means, policy, x, t, labels, g, pretrained, grid, ks, use_reentrant=False)
    return _means(policy, x, t, labels, g, pretrained, grid, ks)


def _means(
    policy, x: Tensor, t: Tensor, labels: Tensor, g: float, pretrained: bool, grid: StepGrid, ks: list[int]
) -> tuple[Tensor, Tensor | None]:
    """One network call and its means: ``x`` is ``len(ks)`` equal blocks, block j at step ``ks[j]`` of ``grid``
    (what a checkpoint recomputes: inside it, nothing of the steps but their input outlives the forward pass)."""
    out, out_pre = policy.predict(x, t, labels, g, pretrained)

    def means(o: Tensor) -> Tensor:
        if len(ks) == 1:
            return grid.step_mean(x, o, ks[0], policy.clip_range)
        blocks = zip(x.chunk(len(ks)), o.chunk(len(ks)), ks)
        return torch.cat([grid.step_mean(xb, ob, k, policy.clip_range) for xb, ob, k in blocks])

    return means(out), None if out_pre is None else means(out_pre)


def _blocks_means(
    policy, x: Tensor, grid: StepGrid, ks: list[int], labels: Tensor, control_scale, checkpointing, pretrained
) -> tuple[Tensor, Tensor | None]:
    """:func:`step_means` of G steps ``ks`` over G equal blocks of ``x`` in one network call."""
    if any(float(grid.sigma[k]) == 0 for k in ks):
        raise ValueError(f"steps evaluated together must all be stochastic (sigma > 0), got {ks}")
    if len(x) % len(ks):
        raise ValueError(f"{len(x)} samples do not split into {len(ks)} equal blocks of steps")
    t = grid.timesteps[ks].repeat_interleave(len(x) // len(ks)).to(x.device)
    return _network_means(policy, x, t, labels, control_scale, pretrained, grid, ks, checkpointing)


@torch.no_grad()
def chain_kl(policy, trajectory: Trajectory) -> Tensor:
    """``[B, N]``: the exact per-step KL of a stored rollout to the pretrained chain, both means evaluated at the
    stored states without gradients (the KL of a rollout sampled without the pretrained model). A rollout that
    kept its policy means (``sample(keep_means=True)``) costs only the pretrained model's call per step."""
    kls = []
    for k in range(trajectory.num_steps):
        s = float(trajectory.grid.sigma[k])
        x = trajectory.latents[:, k]
        if s == 0:
            kls.append(torch.zeros(len(x), device=x.device))
            continue
        if trajectory.means is None:
            mean, mean_pre = step_means(policy, x, trajectory.grid, k, trajectory.labels)
        else:  # at control scale 0 the policy's output is the pretrained model's: one network call
            mean = trajectory.means[:, k]
            mean_pre, _ = step_means(policy, x, trajectory.grid, k, trajectory.labels, control_scale=0.0)
        kls.append(gaussian_kl(mean, mean_pre, s))
    return torch.stack(kls, 1)


def seeded_noise(seeds: Tensor, num_steps: int, sample_shape: tuple[int, ...]) -> Tensor:
    """``[B, N+1, *sample_shape]`` standard normal noise for a chain sampler, chain i's from its own seed
    ``seeds[i]`` alone (the same chain gets the same noise in any batch, on any rank)."""
    shape = (num_steps + 1, *sample_shape)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s) % (1 << 63))) for s in seeds.tolist()]
    )


def _chain_noise(noise: Tensor | None, generator, shape: tuple[int, ...], device) -> Tensor:
    """The chains' standard normal draws of ``shape`` ``[B, N+1, ...]``: ``noise`` checked, or drawn."""
    if noise is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    return noise


def _window_start(controlled: list[int], grad_steps: int, num_steps: int) -> int:
    """The first step that carries gradients when the last ``grad_steps`` of the ``controlled`` steps do."""
    if grad_steps <= 0:
        return num_steps
    return controlled[-grad_steps] if grad_steps <= len(controlled) else 0


def _transition(x_next: Tensor, mean: Tensor, mean_pre: Tensor | None, s: float) -> tuple[Tensor | None, ...]:
    """log-probability of ``x_next`` under the policy's and the pretrained step, and the step's KL, ``[B]`` each
    (zeros for a deterministic step, s = 0; None for what needs the pretrained mean when it was not computed)."""
    if s == 0:
        zero = torch.zeros(len(x_next), device=x_next.device)
        return zero, zero, zero
    x_next = x_next.detach()
    log_prob = gaussian_log_prob(x_next, mean.detach(), s)
    if mean_pre is None:
        return log_prob, None, None
    return log_prob, gaussian_log_prob(x_next, mean_pre.detach(), s), gaussian_kl(mean, mean_pre, s)


def _stacked(steps: list[Tensor | None]) -> Tensor | None:
    """Per-step values ``[B, ...]`` -> ``[B, N, ...]``; None when any step lacks its value."""
    return None if any(v is None for v in steps) else torch.stack(steps, 1)


def sample(
    policy,
    labels: Tensor,
    num_steps: int,
    eta: float = 1.0,
    *,
    control_scale: float = 1.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_steps: int = 0,
    grad_weights: Tensor | None = None,
    kl_grad_steps: int = 0,
    gradient_checkpointing: bool = False,
    pretrained: bool = True,
    keep_means: bool = False,
) -> Trajectory:
    """Sample ``len(labels)`` chains from ``policy``: a :class:`Trajectory` with log-probabilities and KL per step.

    Args:
        policy: a :class:`ctrl.policy.DiffusionPolicy` (``eps``, ``scheduler``, ``sample_shape``).
        labels: ``[B]`` label indices (``policy.null_label`` samples the pretrained model).
        num_steps: N, the number of sampling steps.
        eta: stochasticity (DDIM's in [0, 1], a flow's noise level >= 0); 0: deterministic, every step controlled.
        control_scale: gamma in ``out = out_pre + gamma * (out_theta - out_pre)``; 1 samples the policy.
        noise: ``[B, N+1, C, H, W]`` standard normal draws (x_T, each step's z); else drawn from ``generator``.
        grad_steps: how many of the LAST controlled steps carry gradients (0: none; all or more: the whole chain);
            earlier steps run under no_grad, their output detached (truncated backprop); a deterministic last step
            (sigma = 0) of a stochastic chain is not controlled, nor counted. With the next two, a GradientPlan.
        grad_weights: ``[S]`` multiplier of each controlled step's parameter gradient in the window (None: 1).
        kl_grad_steps: the first steps, outside the window, whose KL keeps its direct gradient.
        gradient_checkpointing: recompute each step's network call in the backward pass.
        pretrained: also evaluate the pretrained model (the KL, ``ref_log_probs``, ``pre_means``); False
            skips that network call where the policy can, and leaves those fields None.
        keep_means: also store the policy's step means (``Trajectory.means``, for :func:`chain_kl`).
    """
    grid = make_grid(policy.scheduler, num_steps, eta)
    noise = _chain_noise(noise, generator, (len(labels), num_steps + 1, *policy.sample_shape), labels.device)
    x = noise[:, 0]
    latents, records = [x], []  # per step: log_prob, ref_log_prob, kl ([B] each), the pretrained and policy means
    controlled = grid.controlled_steps
    first_grad_step = _window_start(controlled, grad_steps, num_steps)
    weights = dict(zip(controlled, grad_weights.tolist())) if grad_weights is not None else {}
    grad_enabled = torch.is_grad_enabled()
    for k in range(num_steps):
        s = float(grid.sigma[k])
        in_window, kl_only = k >= first_grad_step, k < min(kl_grad_steps, first_grad_step) and s > 0
        weight = weights.get(k, 1.0) if in_window else 1.0
        with torch.set_grad_enabled(grad_enabled and (in_window or kl_only)):
            if k == first_grad_step or kl_only:
                x = x.detach()
            mean, mean_pre = step_means(
                policy, x, grid, k, labels, control_scale, gradient_checkpointing, weight, pretrained
            )
            x_next = mean + s * noise[:, k + 1] if s > 0 else mean
            kept = (None if mean_pre is None else mean_pre.detach(), mean.detach() if keep_means else None)
            records.append((*_transition(x_next, mean, mean_pre, s), *kept))
        x = x_next.detach() if kl_only else x_next
        latents.append(x)
    log_probs, ref_log_probs, kls, pre_means, means = (_stacked(list(r)) for r in zip(*records))
    return Trajectory(torch.stack(latents, 1), log_probs, kls, ref_log_probs, labels, grid, pre_means, means)
