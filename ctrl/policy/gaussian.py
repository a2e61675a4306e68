"""Closed-form worlds: a pretrained model whose data is N(m, s^2 I), so its prediction is exact at every t.

With a Gaussian log-likelihood reward the KL-regularised optimum p_pre(x) exp(r(x)/alpha) / Z is
Gaussian with a mean and covariance known in closed form (``ctrl.evaluation.TiltedGaussianEvaluator``),
which is how every algorithm is checked for correctness. :class:`AnalyticGaussian` is the DDPM/DDIM world
(noise prediction), :class:`AnalyticGaussianFlow` the flow-matching one (velocity prediction); both share
the trainable control and the exact chain of :class:`GaussianWorld`.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from ctrl.errors import SettingError
from ctrl.linear_gaussian import AffineStep, chain_moments
from ctrl.policy.base import DiffusionPolicy
from ctrl.sampling import make_grid, step_means


class GaussianWorld(DiffusionPolicy):
    """Data N(m, s^2 I) in ``dim`` dimensions, its exact pretrained prediction (:meth:`pretrained_prediction`,
    in a subclass), plus a trainable correction of that prediction.

    The correction is affine in x per timestep bucket, ``x @ W[k].T + b[k]`` (zero-initialised): every step
    of the pretrained chain is affine in x and the optimal control of a Gaussian problem is affine, so the
    family contains the target.

    Args:
        dim: d.
        mean: m, a list of d numbers or one number for every coordinate.
        std: s > 0.
        num_buckets: timestep buckets of the correction (``t * num_buckets // num_train_timesteps``).
        lr: learning rate of the correction.
        num_labels: conditions, all sharing the one correction (the Gaussian reward ignores them): many
            labels with ``data.group_size`` chains each give per-condition baselines small groups to test.
    """

    def __init__(
        self,
        dim: int = 2,
        mean: list[float] | float = 0.0,
        std: float = 1.0,
        num_buckets: int = 50,
        lr: float = 1e-2,
        num_labels: int = 1,
    ):
        super().__init__()
        if dim < 1:
            raise SettingError(self, "dim", f"must be >= 1, got {dim}.")
        if std <= 0:
            raise SettingError(self, "std", f"must be > 0, got {std}.")
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        if m.numel() == 1:
            m = m.expand(dim).clone()
        if m.numel() != dim:
            raise SettingError(self, "mean", f"has {m.numel()} entries but dim is {dim}; give {dim} numbers or one.")
        self.register_buffer("mean", m)
        self.std, self.dim, self.num_buckets, self.lr = float(std), dim, num_buckets, lr
        if num_labels < 1:
            raise SettingError(self, "num_labels", f"must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.sample_shape = (dim,)
        self.weight = nn.Parameter(torch.zeros(num_buckets, dim, dim))
        self.bias = nn.Parameter(torch.zeros(num_buckets, dim))

    def pretrained_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact prediction ``[B, d]`` of the pretrained model for data N(m, s^2 I) at timestep ``t``
        (``[]`` or ``[B]``)."""
        raise NotImplementedError

    @torch.no_grad()
    def affine_steps(self, num_steps: int, eta: float, control_scale: float = 1.0) -> list[AffineStep]:
        """The chain on an N-step grid as affine steps ``x' = F x + g + sigma z`` (sampling order), read off
        by probing each step's mean at 0 and at the unit vectors: every step of this world is affine in x.
        ``control_scale`` 0 is the pretrained chain, 1 the policy's (its current correction, label 0)."""
        grid = make_grid(self.scheduler, num_steps, eta)
        probe = torch.cat([torch.zeros(1, self.dim), torch.eye(self.dim)]).to(self.mean.device)
        labels = torch.zeros(len(probe), dtype=torch.long, device=probe.device)
        steps = []
        for k in range(num_steps):
            mean = step_means(self, probe, grid, k, labels, control_scale)[0].double().cpu()
            steps.append(AffineStep((mean[1:] - mean[0]).T, mean[0], float(grid.sigma[k])))
        return steps

    def pretrained_marginal(self, num_steps: int, eta: float) -> tuple[Tensor, float]:
        """Mean ``[d]`` and variance (isotropic) of x_0 from the PRETRAINED chain on an N-step grid.

        A coarse grid does not reproduce N(m, s^2 I) exactly (a DDIM/DDPM step keeps only the posterior
        mean of x_0, an Euler step of a flow errs by O(dt^2), and the last step is deterministic), so the
        target of fine-tuning, p_pre(x) exp(r(x) / alpha), is computed from what the pretrained sampler
        really gives.
        """
        mean, cov = chain_moments(self.affine_steps(num_steps, eta, control_scale=0.0))
        return mean.float(), float(cov[0, 0])

    def predict(self, x: Tensor, t: Tensor, labels: Tensor, control_scale: float = 1.0, pretrained: bool = True):
        out_pre = self.pretrained_prediction(x, t)  # closed form and the correction's base: always computed
        k = (t.long() * self.num_buckets // self.scheduler.config.num_train_timesteps).clamp(0, self.num_buckets - 1)
        if k.dim() == 0:
            correction = x @ self.weight[k].T + self.bias[k]
        else:  # a bucket per sample
            correction = (self.weight[k] @ x.unsqueeze(-1)).squeeze(-1) + self.bias[k]
        active = (labels != self.null_label).to(x.dtype).view(-1, 1)
        return out_pre + (control_scale * active) * correction, out_pre

    def param_groups(self) -> list[dict]:
        return [dict(name="correction", params=[self.weight, self.bias], lr=self.lr)]


class AnalyticGaussian(GaussianWorld):
    """The DDPM/DDIM world: exact pretrained eps. With ``x_t = sqrt(a) x0 + sqrt(1 - a) z`` the marginal is
    N(sqrt(a) m, (a s^2 + 1 - a) I), so

        eps_pre(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a).

    Args: as :class:`GaussianWorld`, and
        num_train_timesteps, beta_schedule: the noise schedule (diffusers DDIMScheduler).
    """

    def __init__(
        self,
        dim: int = 2,
        mean: list[float] | float = 0.0,
        std: float = 1.0,
        num_buckets: int = 50,
        lr: float = 1e-2,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        num_labels: int = 1,
    ):
        super().__init__(dim, mean, std, num_buckets, lr, num_labels)
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            clip_sample=False,
            timestep_spacing="trailing",
        )
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float().clone())

    def pretrained_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t.long()].reshape(-1, 1)  # [1 or B, 1]
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


class AnalyticGaussianFlow(GaussianWorld):
    """The flow-matching world: exact pretrained velocity. With ``x_t = (1 - t) x0 + t z`` the marginal is
    N((1 - t) m, V_t I), ``V_t = (1 - t)^2 s^2 + t^2``, and the velocity ``E[z - x0 | x_t]`` is

        v_pre(x_t, t) = (t - (1 - t) s^2) / V_t * (x_t - (1 - t) m) - m.

    Args: as :class:`GaussianWorld`, and
        num_train_timesteps, shift: the grid of diffusers' FlowMatchEulerDiscreteScheduler (t = timestep /
            num_train_timesteps; ``shift`` > 1 spends more steps near the noise, as Stable Diffusion 3's 3.0).
    """

    def __init__(
        self,
        dim: int = 2,
        mean: list[float] | float = 0.0,
        std: float = 1.0,
        num_buckets: int = 50,
        lr: float = 1e-2,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        num_labels: int = 1,
    ):
        super().__init__(dim, mean, std, num_buckets, lr, num_labels)
        if shift <= 0:
            raise SettingError(self, "shift", f"must be > 0, got {shift}.")
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)

    def pretrained_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        t = (t.to(x.dtype) / self.scheduler.config.num_train_timesteps).reshape(-1, 1)  # [1 or B, 1]
        var = (1 - t).square() * self.std**2 + t.square()
        return (t - (1 - t) * self.std**2) / var * (x - (1 - t) * self.mean) - self.mean
