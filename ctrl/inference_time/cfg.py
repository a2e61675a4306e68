"""Classifier-free guidance (Ho & Salimans 2022): a conditional model learned from the offline labelled data
with label dropout, sampled with its conditional and unconditional predictions mixed."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ctrl.assets import resolve_path
from ctrl.conditions import condition_codes, split_condition
from ctrl.errors import SettingError, non_negative, setting
from ctrl.inference_time.base import GuidedSampler
from ctrl.pretrain import load_conditional_unet
from ctrl.sampling import DDIMGrid, step_mean


class ClassifierFreeGuidance(GuidedSampler):
    """``eps = eps(x, null) + scale * sum_s (eps(x, y_s) - eps(x, null))`` from a conditional model (its own
    network, not the pretrained one; :class:`ctrl.pretrain.DiffusionPretraining` with ``num_labels``).

    With one label set this is classifier-free guidance (scale 1: the conditional model itself). With
    several (a multi-task condition ``(y_1, ..., y_S)`` numbered as :func:`ctrl.conditions.split_condition`
    does), each set's term comes from the model conditioned on that set alone, as the model learned each
    from its own offline data: the composition of conditionally independent labels (composable diffusion).
    The reward classifier is not used. Costs per step: S + 1 denoiser calls per image (one batched call).

    Args:
        pretrained: the conditional model's directory (written by ``DiffusionPretraining``'s ``export_dir``;
            ``ctrl:<name>`` for a shipped one). None: ``ctrl benchmark`` trains one from a
            ``baseline_models`` entry and loads it (:meth:`load`).
        scale: the guidance scale (>= 0; 0: the conditional model's unconditional branch): p(x) p(y|x)^scale
            with the model's own implicit classifier, the tilt of fine-tuning with KL weight alpha = 1 / scale.
    """

    tilt_setting, tilt_is_scale = "scale", True

    requires_model = True

    def __init__(self, pretrained: str | None = None, scale: float = 2.0):
        self.pretrained, self.scale = pretrained, non_negative(self, "scale", scale)
        self.model = None  # (x [N, ...], t, codes [N]) -> eps [N, ...]
        self.sizes: list[int] = []
        self.alphas_cumprod: Tensor | None = None
        if pretrained is not None:
            self.load(pretrained)

    def has_model(self) -> bool:
        return self.model is not None

    def load(self, path: str | Path) -> None:
        with setting(self, "pretrained", str(path)):
            unet, scheduler, sizes = load_conditional_unet(resolve_path(str(path)))
        self.model = lambda x, t, codes: unet(x, t, class_labels=codes).sample
        self.sizes, self.alphas_cumprod = sizes, scheduler.alphas_cumprod.float()

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, policy, reward, labels: Tensor, grid: DDIMGrid, noise: Tensor, generator) -> Tensor:
        if self.model is None:
            raise SettingError(
                self,
                "pretrained",
                "no conditional model to sample: give its directory, or load() "
                "one (ctrl benchmark trains it from a baseline_models entry).",
            )
        if math.prod(self.sizes) != policy.num_labels:
            raise SettingError(
                self,
                "pretrained",
                f"the conditional model knows label sets of sizes {self.sizes} "
                f"({math.prod(self.sizes)} conditions) but the task has {policy.num_labels}; "
                "train it on the task's label sets.",
            )
        if self.alphas_cumprod is not None and not torch.allclose(
            self.alphas_cumprod, policy.scheduler.alphas_cumprod.float(), atol=1e-6
        ):
            raise SettingError(
                self,
                "pretrained",
                "the conditional model's noise schedule differs from the pretrained "
                "model's; train it with init_from set to the pretrained model.",
            )
        b, sets = len(labels), len(self.sizes)
        null = torch.tensor(self.sizes, device=labels.device).repeat(b, 1)  # [B, S]
        rows = [null]  # the unconditional branch, then one branch per label set
        for s, y in enumerate(split_condition(labels, self.sizes)):
            row = null.clone()
            row[:, s] = y
            rows.append(row)
        codes = condition_codes(torch.cat(rows), self.sizes)  # [(S+1) * B]
        x = noise[:, 0]
        for k in range(len(grid.timesteps)):
            eps_all = self.model(x.repeat(sets + 1, *[1] * (x.dim() - 1)), grid.timesteps[k].to(x.device), codes)
            self._denoiser_calls += len(codes)
            eps_all = eps_all.view(sets + 1, *x.shape)
            eps = eps_all[0] + self.scale * (eps_all[1:] - eps_all[0]).sum(0)
            s = float(grid.sigma[k])
            x = step_mean(x, eps, float(grid.alpha_prod[k]), float(grid.alpha_prod_prev[k]), s, policy.clip_range)
            if s > 0:
                x = x + s * noise[:, k + 1]
        return x
