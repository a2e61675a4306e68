"""A closed-form world: a pretrained model whose data is N(m, s^2 I), so its eps is exact at every t.

With a Gaussian log-likelihood reward the KL-regularised optimum p_pre(x) exp(r(x)/alpha) / Z is
Gaussian with a mean and covariance known in closed form (``ctrl.evaluation.TiltedGaussianEvaluator``),
which is how every algorithm is checked for correctness.
"""

from __future__ import annotations


import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from ctrl.policy.base import DiffusionPolicy


class AnalyticGaussian(DiffusionPolicy):
    """Exact pretrained eps for data N(m, s^2 I) in ``dim`` dimensions, plus a trainable correction.

    With ``x_t = sqrt(a) x0 + sqrt(1 - a) z`` the marginal is N(sqrt(a) m, (a s^2 + 1 - a) I), so

        eps_pre(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a).

    The correction is affine in x per timestep bucket, ``x @ W[k].T + b[k]`` (zero-initialised):
    the optimal control of a Gaussian problem is affine, so the family contains the target.

    Args:
        dim: d.
        mean: m, a list of d numbers or one number for every coordinate.
        std: s > 0.
        num_buckets: timestep buckets of the correction (``t * num_buckets // num_train_timesteps``).
        lr: learning rate of the correction.
        num_train_timesteps, beta_schedule: the noise schedule (diffusers DDIMScheduler).
    """

    def __init__(self, dim: int = 2, mean: list[float] | float = 0.0, std: float = 1.0, num_buckets: int = 50,
                 lr: float = 1e-2, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
        super().__init__()
        if dim < 1:
            raise ValueError(f"model.policy.dim must be >= 1, got {dim}.")
        if std <= 0:
            raise ValueError(f"model.policy.std must be > 0, got {std}.")
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        if m.numel() == 1:
            m = m.expand(dim).clone()
        if m.numel() != dim:
            raise ValueError(f"model.policy.mean has {m.numel()} entries but dim is {dim}; give {dim} numbers or one.")
        self.register_buffer("mean", m)
        self.std, self.dim, self.num_buckets, self.lr = float(std), dim, num_buckets, lr
        self.num_labels = 1
        self.sample_shape = (dim,)
        self.scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       clip_sample=False, timestep_spacing="trailing")
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float().clone())
        self.weight = nn.Parameter(torch.zeros(num_buckets, dim, dim))
        self.bias = nn.Parameter(torch.zeros(num_buckets, dim))

    def eps_pretrained(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t.long()]
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)

    @torch.no_grad()
    def pretrained_marginal(self, num_steps: int, eta: float) -> tuple[Tensor, float]:
        """Mean ``[d]`` and variance (isotropic) of x_0 from the PRETRAINED chain on an N-step grid.

        A coarse DDIM/DDPM grid does not reproduce N(m, s^2 I) exactly (each step keeps only the
        posterior mean of x_0, and the last step is deterministic), so the target of fine-tuning,
        p_pre(x) exp(r(x) / alpha), is computed from what the pretrained sampler really gives. Every
        step is affine in x, ``x' = f x + g + sigma z``, so the moments propagate exactly.
        """
        from ctrl.sampling import make_grid, step_mean

        grid = make_grid(self.scheduler, num_steps, eta)
        mean, var = torch.zeros(self.dim, dtype=torch.float64), 1.0
        probe = torch.stack([torch.zeros(self.dim), torch.ones(self.dim)]).double()
        for k in range(num_steps):
            t = grid.timesteps[k]
            eps = self.eps_pretrained(probe.float(), t).double()
            out = step_mean(probe, eps, float(grid.alpha_prod[k]), float(grid.alpha_prod_prev[k]), float(grid.sigma[k]))
            g, f = out[0], (out[1] - out[0])  # f is the same in every coordinate (isotropic step)
            mean, var = f * mean + g, float(f[0]) ** 2 * var + float(grid.sigma[k]) ** 2
        return mean.float(), var

    def eps(self, x: Tensor, t: Tensor, labels: Tensor, guidance: float = 1.0) -> tuple[Tensor, Tensor]:
        eps_pre = self.eps_pretrained(x, t)
        k = (t.long() * self.num_buckets // self.scheduler.config.num_train_timesteps).clamp(0, self.num_buckets - 1)
        correction = x @ self.weight[k].T + self.bias[k]
        active = (labels != self.null_label).to(x.dtype).view(-1, 1)
        return eps_pre + (guidance * active) * correction, eps_pre

    def param_groups(self) -> list[dict]:
        return [dict(name="correction", params=[self.weight, self.bias], lr=self.lr)]
