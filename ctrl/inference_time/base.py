"""The interface of inference-time methods: sample a pretrained model toward a reward without training it.

Every guided sampler draws from the PRETRAINED model's noise prediction (``policy.predict(..., control_scale=0)``,
whatever the policy's trainable part holds) on the same DDIM/DDPM grid as ctrl's one sampler
(:func:`ctrl.sampling.make_grid`, :func:`ctrl.sampling.predict_x0`, :func:`ctrl.sampling.step_from_x0`),
scores with the same reward as fine-tuning (``policy.score``: for conditional control a classifier's
log p(y|x0)), and counts what it costs: denoiser evaluations and reward evaluations (gradients
included) per image, and wall-clock seconds per image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ctrl.sampling import DDIMGrid, is_flow_scheduler, make_grid, predict_x0, seeded_noise, step_from_x0
from ctrl.seeds import derived_seed


@dataclass
class GuidedSamples:
    """What a guided sampler returns.

    Attributes:
        samples: ``[B, ...]`` final samples x_0 (in the policy's sample space; ``policy.decode`` for images).
        labels: ``[B]`` the conditions they were sampled for.
        denoiser_calls_per_image: network evaluations of the pretrained model per returned image (a batch
            of n inputs counts n).
        reward_calls_per_image: reward evaluations per returned image (with or without its gradient).
        seconds_per_image: wall-clock time per returned image.
    """

    samples: Tensor
    labels: Tensor
    denoiser_calls_per_image: float
    reward_calls_per_image: float
    seconds_per_image: float


def extra_draw_seed(seeds: Tensor) -> int:
    """The seed of the generator of a batch's extra draws (candidates, particles, resampling) for its chain
    seeds ``[B]``: derived from all of them, in order (:func:`ctrl.seeds.derived_seed`), so the draws are
    reproducible, change with any chain of the batch, and are never a validation or test chain's noise
    (a seed near them, such as ``seeds[0] + 1``, would be the next chain's)."""
    return derived_seed("guided sampler extra draws", *seeds.tolist())


class GuidedSampler:
    """Template of a guided sampler: :meth:`sample` sets up the grid, the noise and the counters and calls
    :meth:`run`; a subclass implements :meth:`guided_step` (one guided DDIM step per image) or its own
    :meth:`run` (particles, candidates), with :meth:`eps`, :meth:`x0_hat` and :meth:`score`.

    The chains' starting noise x_T comes from their seeds exactly as in ctrl's own sampler
    (:func:`ctrl.sampling.seeded_noise`), so every method starts from the same x_T for the same seed; any
    further draw comes from one generator per batch seeded by :func:`extra_draw_seed`.

    A method whose strength sets the tilt of its target, p_pre(x) p(y|x)^(1/alpha) for the reward log p(y|x)
    (the target of fine-tuning with KL weight alpha), names that setting in ``tilt_setting``; ``tilt_is_scale``
    says whether its value is the exponent 1/alpha (a guidance scale) rather than alpha itself.
    ``ctrl benchmark`` runs such methods at the fine-tuning rows' alpha.
    """

    tilt_setting: str | None = None
    tilt_is_scale: bool = False

    def target_alpha(self) -> float | None:
        """The KL weight alpha of the target this method's strength aims at (inf: the pretrained model);
        None when no setting of the method names a target."""
        if self.tilt_setting is None:
            return None
        value = float(getattr(self, self.tilt_setting))
        if not self.tilt_is_scale:
            return value
        return 1 / value if value > 0 else math.inf

    def sample(self, policy, reward, labels: Tensor, seeds: Tensor, num_steps: int, eta: float = 1.0) -> GuidedSamples:
        """Guided samples for ``labels`` ``[B]`` with noise fixed by ``seeds`` ``[B]``."""
        policy.check_labels(labels.tolist(), "guided sampling labels")
        if is_flow_scheduler(policy.scheduler):
            raise ValueError(
                f"{type(self).__name__} guides DDPM/DDIM (noise-prediction) models; this policy's scheduler is "
                f"{type(policy.scheduler).__name__} (flow matching): fine-tune it with a plugin instead."
            )
        self._denoiser_calls, self._reward_calls = 0, 0
        grid = make_grid(policy.scheduler, num_steps, eta)
        noise = seeded_noise(seeds, num_steps, policy.sample_shape).to(labels.device)
        generator = torch.Generator(device="cpu").manual_seed(extra_draw_seed(seeds))
        start = time.perf_counter()
        samples = self.run(policy, reward, labels, grid, noise, generator)
        seconds = time.perf_counter() - start
        n = len(labels)
        return GuidedSamples(samples.detach(), labels, self._denoiser_calls / n, self._reward_calls / n, seconds / n)

    def run(self, policy, reward, labels: Tensor, grid: DDIMGrid, noise: Tensor, generator: torch.Generator) -> Tensor:
        """The final samples ``[B, ...]``. ``noise`` ``[B, N+1, ...]`` holds each chain's x_T (``noise[:, 0]``)
        and one standard normal draw per step; ``generator`` serves any further draws (particles,
        candidates, resampling). Default: one chain per image, each DDIM step taken from the guided
        ``(x0, eps)`` of :meth:`guided_step`."""
        x = noise[:, 0]
        for k in range(len(grid.timesteps)):
            x0, eps = self.guided_step(policy, reward, x, grid, k, labels)
            s = float(grid.sigma[k])
            x = (step_from_x0(x0, eps, float(grid.alpha_prod_prev[k]), s) + s * noise[:, k + 1]).detach()
        return x

    def guided_step(self, policy, reward, x: Tensor, grid: DDIMGrid, k: int, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The denoised estimate and noise ``[B, ...]`` each that step k of the default :meth:`run` takes."""
        raise NotImplementedError(f"{type(self).__name__} implements neither run nor guided_step.")

    #: the method samples a model of its own that must be trained first (``ctrl benchmark`` trains it from a
    #: ``baseline_models`` entry and calls :meth:`load`); the others use the pretrained model alone
    requires_model: ClassVar[bool] = False

    def has_model(self) -> bool:
        """Whether the method's own model is given (always, for methods that need none)."""
        return not self.requires_model

    def load(self, path) -> None:
        """Load the method's own trained model from ``path`` (methods with ``requires_model``)."""
        raise TypeError(f"{type(self).__name__} samples the pretrained model alone; it loads no model of its own.")

    # -- helpers ------------------------------------------------------------------------------------
    def eps(self, policy, x: Tensor, grid: DDIMGrid, k: int, labels: Tensor) -> Tensor:
        """The pretrained model's noise prediction at step k, ``like x`` (gradients flow through x)."""
        self._denoiser_calls += len(x)
        return policy.predict(x, grid.timesteps[k].to(x.device), labels, 0.0)[1]

    def x0_hat(self, policy, x: Tensor, eps: Tensor, grid: DDIMGrid, k: int) -> Tensor:
        return predict_x0(x, eps, float(grid.alpha_prod[k]), policy.clip_range)

    def score(self, policy, reward, x0: Tensor, labels: Tensor) -> Tensor:
        """The reward of (estimated) samples, ``[B]``, counted."""
        self._reward_calls += len(x0)
        return policy.score(reward, x0, labels)


def randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator`` (on the CPU, then moved), like ``like``."""
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)
