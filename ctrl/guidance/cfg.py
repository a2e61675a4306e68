"""Classifier-free guidance (Ho & Salimans 2022): a conditional model learned from the offline labelled data
with label dropout, sampled with its conditional and unconditional predictions mixed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from ctrl.guidance.base import GuidedSampler
from ctrl.pretrain import condition_codes, load_conditional_unet
from ctrl.rewards.joint import split_condition
from ctrl.sampling import StepGrid, step_mean

SETTING = "guidance ClassifierFreeGuidance"


class ClassifierFreeGuidance(GuidedSampler):
    """``eps = eps(x, null) + scale * sum_s (eps(x, y_s) - eps(x, null))`` from a conditional model (its own
    network, not the pretrained one; :class:`ctrl.pretrain.DiffusionPretraining` with ``num_labels``).

    With one label set this is classifier-free guidance (scale 1: the conditional model itself). With
    several (a multi-task condition ``(y_1, ..., y_S)`` numbered as :func:`ctrl.rewards.joint.split_condition`
    does), each set's term comes from the model conditioned on that set alone, as the model learned each
    from its own offline data: the composition of conditionally independent labels (composable diffusion).
    The reward classifier is not used. Costs per step: S + 1 denoiser calls per image (one batched call).

    Args:
        pretrained: the conditional model's directory (written by ``export_dir``), or
        config: a ``ctrl fit`` config that trains it (``ctrl benchmark`` runs it once, under its runs folder,
            and reuses the result; the training time is the row's).
        args: extra command-line overrides of ``config`` (e.g. ``["--trainer.max_steps", "300"]``).
        scale: the guidance scale (>= 0; 0: the conditional model's unconditional branch).
    """

    def __init__(self, pretrained: str | None = None, config: str | None = None, scale: float = 2.0,
                 args: list[str] | None = None):
        if (pretrained is None) == (config is None):
            raise ValueError(f"{SETTING}: give exactly one of pretrained (a conditional model's directory) or config "
                             "(a ctrl fit config that trains one, e.g. configs/digits/cfg_compressibility.yaml).")
        if scale < 0:
            raise ValueError(f"{SETTING}: scale must be >= 0, got {scale}.")
        self.pretrained, self.config, self.scale, self.args = pretrained, config, scale, list(args or [])
        self.model = None  # (x [N, ...], t, codes [N]) -> eps [N, ...]
        self.sizes: list[int] = []
        self.alphas_cumprod: Tensor | None = None

    # -- the conditional model ------------------------------------------------------------------------
    def _fit_args(self, root: Path) -> list[str]:
        return ["--config", str(self.config), *self.args, "--trainer.default_root_dir", str(root),
                "--model.export_dir", str(root / "model"), "--trainer.enable_progress_bar", "false"]

    def check(self, root: Path) -> None:
        if self.config is not None:
            from ctrl.cli import main

            main(self._fit_args(root), run=False)  # instantiates (and so checks) the training config
        else:
            self.load(self.pretrained)

    def prepare(self, root: Path, retrain: bool = False) -> float:
        if self.config is None:
            if self.model is None:  # check() has loaded it already
                self.load(self.pretrained)
            return 0.0
        done = root / "train_seconds.json"
        if retrain or not done.is_file():
            from ctrl.cli import main

            start = time.perf_counter()
            main(["fit", *self._fit_args(root)])
            done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
        self.load(root / "model")
        return json.loads(done.read_text())["seconds"]

    def load(self, path: str | Path) -> None:
        from ctrl.policy.unet import resolve_path

        unet, scheduler, sizes = load_conditional_unet(resolve_path(str(path)), f"{SETTING} pretrained")
        self.model = lambda x, t, codes: unet(x, t, class_labels=codes).sample
        self.sizes, self.alphas_cumprod = sizes, scheduler.alphas_cumprod.float()

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, policy, reward, labels: Tensor, grid: StepGrid, noise: Tensor, generator) -> Tensor:
        if self.model is None:
            if self.pretrained is None:
                raise RuntimeError(f"{SETTING}: the conditional model is not trained yet; call prepare() (ctrl benchmark does).")
            self.load(self.pretrained)
        if math.prod(self.sizes) != policy.num_labels:
            raise ValueError(f"{SETTING}: the conditional model knows label sets of sizes {self.sizes} "
                             f"({math.prod(self.sizes)} conditions) but the task has {policy.num_labels}; "
                             "train it on the task's label sets.")
        if self.alphas_cumprod is not None and not torch.allclose(
                self.alphas_cumprod, policy.scheduler.alphas_cumprod.float(), atol=1e-6):
            raise ValueError(f"{SETTING}: the conditional model's noise schedule differs from the pretrained "
                             "model's; train it with init_from set to the pretrained model.")
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
