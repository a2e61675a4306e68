"""Train a diffusion model: a diffusers UNet2DModel, unconditional or conditional, by denoising (DDPM: epsilon
prediction) or by flow matching (rectified flow: velocity prediction, as Stable Diffusion 3 is trained).

Unconditional: how the shipped ``ctrl:digits-ddpm`` weights are made (configs/digits/pretrain.yaml).
Conditional (``num_labels``): the model of the classifier-free guidance baseline
(:class:`ctrl.inference_time.ClassifierFreeGuidance`), learned from offline labelled data with label dropout,
usually starting from the pretrained unconditional model (``init_from``). Several label sets at once
(``num_labels: [4, 2]``) are learned from data in which each image carries one set's label (the others
null); the sampler composes them.

The exponential moving average of the weights is exported with ``save_pretrained`` as a
DDPMPipeline-style directory (``unet/``, ``scheduler/``; a conditional model adds ``labels.json``),
which ``UNetPolicy(pretrained=...)`` (unconditional), :func:`load_conditional_unet` and diffusers' own
``from_pretrained`` load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ctrl.assets import notice_if_shadowed
from ctrl.conditions import condition_codes
from ctrl.errors import SettingError, setting, trained_at_least_one_step
from ctrl.policy.unet import load_pretrained_unet
from ctrl.sampling import is_flow_scheduler

LABELS_FILE = "labels.json"


def load_conditional_unet(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler, list[int]]:
    """The EMA UNet, noise schedule and label-set sizes written by a conditional :class:`DiffusionPretraining`
    (FileNotFoundError when ``path`` holds none; the class whose setting gave it names it)."""
    path = Path(path)
    if not (path / LABELS_FILE).is_file() or not (path / "unet").is_dir():
        raise FileNotFoundError(
            f"'{path}' holds no conditional model (unet/ and {LABELS_FILE}); train one "
            "with ctrl.pretrain.DiffusionPretraining and num_labels set (e.g. configs/digits/cfg_*.yaml)."
        )
    sizes = json.loads((path / LABELS_FILE).read_text())["num_labels"]
    unet = UNet2DModel.from_pretrained(path / "unet").eval().requires_grad_(False)
    return unet, DDPMScheduler.from_pretrained(path / "scheduler"), sizes


def _checked_schedule(owner, objective: str, init_from: str, schedule) -> dict:
    """The ``init_from`` model's scheduler config; another training objective than the one that model was trained
    for is refused."""
    kind = "flow_matching" if is_flow_scheduler(schedule) else "ddpm"
    if objective != kind:
        raise SettingError(
            owner, "objective", f"{objective!r}, but init_from={init_from!r} is a {kind} model: set objective {kind}"
        )
    return schedule.config


class DiffusionPretraining(L.LightningModule):
    """Denoising score matching for a UNet2DModel.

    Args:
        sample_size, in_channels, block_out_channels, layers_per_block, down_block_types,
        up_block_types: the UNet2DModel (attention sits in its middle block).
        objective: "ddpm" (x_t = sqrt(a) x_0 + sqrt(1 - a) z, predict z; a DDPMScheduler) or "flow_matching"
            (x_t = (1 - t) x_0 + t z with t ~ U(0, 1), predict the velocity z - x_0; a FlowMatchEulerDiscreteScheduler
            whose grid the sampler steps; the timestep input is t * num_train_timesteps).
        num_train_timesteps, beta_schedule: the DDPM noise schedule (saved with the weights); a flow model's
            timestep scale.
        shift: a flow model's grid shift (saved with its scheduler; > 1 spends more sampling steps near the noise).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay over the run.
        ema_decay: decay of the exported exponential moving average.
        export_dir: where the EMA model is written when fit ends.
        num_labels: None: unconditional (batches ``(x,)`` or ``(x, labels)``, labels ignored). An int or a
            list of label-set sizes: conditional on batches ``(x, labels)``, labels ``[B]`` (one set) or
            ``[B, S]`` with ``num_labels[s]`` as set s's null label; a class embedding (zero-initialised)
            is added to the time embedding.
        label_dropout: probability that an image's labels are all replaced by null during training
            (classifier-free guidance needs the unconditional model too).
        embedding_lr: learning rate of the class embedding (None: ``lr``). A new embedding next to a
            pretrained network needs a larger one than the fine-tune of the rest.
        init_from: start from this unconditional model (a directory or ``ctrl:digits-ddpm``): its
            architecture, weights and noise schedule; the architecture arguments above are then unused.
    """

    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 2,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        objective: Literal["ddpm", "flow_matching"] = "ddpm",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        shift: float = 1.0,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        ema_decay: float = 0.995,
        export_dir: str | None = None,
        num_labels: int | list[int] | None = None,
        label_dropout: float = 0.1,
        embedding_lr: float | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.label_sizes = self._label_sizes(num_labels, label_dropout)
        class_embeds = math.prod(n + 1 for n in self.label_sizes) if self.label_sizes else None
        if init_from is not None:
            with setting(self, "init_from", init_from):
                base, schedule = load_pretrained_unet(init_from)
            self.unet = UNet2DModel.from_config(base.config, num_class_embeds=class_embeds)
            missing, _ = self.unet.load_state_dict(base.state_dict(), strict=False)
            assert all(name.startswith("class_embedding") for name in missing), missing
            scheduler_config = _checked_schedule(self, objective, init_from, schedule)
        else:
            self.unet = UNet2DModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=in_channels,
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                down_block_types=tuple(down_block_types),
                up_block_types=tuple(up_block_types),
                norm_num_groups=8,
                attention_head_dim=8,
                num_class_embeds=class_embeds,
            )
            scheduler_config = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
            if objective == "flow_matching":
                scheduler_config = dict(num_train_timesteps=num_train_timesteps, shift=shift)
        if class_embeds:  # the model starts as the unconditional one for every label
            nn.init.zeros_(self.unet.class_embedding.weight)
        self.unet.requires_grad_(True)
        self.unet.train()
        if objective == "flow_matching":
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        else:  # clip_sample off: the sampler's step is then exactly Gaussian in eps (docs/design.md's KL)
            ddpm = dict(clip_sample=False, timestep_spacing="trailing")
            self.scheduler = DDPMScheduler.from_config(scheduler_config, **ddpm)
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)

    def _label_sizes(self, num_labels: int | list[int] | None, label_dropout: float) -> list[int] | None:
        """The label-set sizes of a conditional model (None: unconditional), its settings checked."""
        sizes = None if num_labels is None else [num_labels] if isinstance(num_labels, int) else list(num_labels)
        if sizes is not None and (not sizes or min(sizes) < 1):
            raise SettingError(
                self, "num_labels", f"give a label-set size >= 1 (or one per label set), got {num_labels}."
            )
        if not 0 <= label_dropout < 1:
            raise SettingError(self, "label_dropout", f"must lie in [0, 1), got {label_dropout}.")
        return sizes

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        noise = torch.randn_like(x0)
        xt, t, target = self._noised(x0, noise)
        kwargs = {}
        if self.label_sizes is not None:
            if len(batch) < 2:
                raise ValueError(
                    "model.num_labels is set but the data has no labels; use labelled data "
                    "(e.g. DigitsDataModule with label_set) or leave num_labels unset."
                )
            labels = batch[1].view(len(x0), -1)
            if labels.shape[1] != len(self.label_sizes):
                raise ValueError(
                    f"the data carries {labels.shape[1]} label set(s) but model.num_labels has "
                    f"{len(self.label_sizes)} ({self.label_sizes}); make them agree."
                )
            null = torch.tensor(self.label_sizes, device=labels.device)
            drop = torch.rand(len(x0), 1, device=labels.device) < self.hparams.label_dropout
            kwargs["class_labels"] = condition_codes(torch.where(drop, null, labels), self.label_sizes)
        loss = F.mse_loss(self.unet(xt, t, **kwargs).sample, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _noised(self, x0: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A random point of the forward process for each image: x_t ``[B, C, H, W]``, the network's timestep input
        ``[B]`` and its regression target (the noise, or a flow's velocity) ``[B, C, H, W]``."""
        n = self.scheduler.config.num_train_timesteps
        if is_flow_scheduler(self.scheduler):
            t = torch.rand(len(x0), device=x0.device).view(-1, 1, 1, 1)
            return (1 - t) * x0 + t * noise, t.flatten() * n, noise - x0
        t = torch.randint(0, n, (len(x0),), device=x0.device)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        embedding = list(self.unet.class_embedding.parameters()) if self.unet.class_embedding is not None else []
        rest = [p for n, p in self.unet.named_parameters() if not n.startswith("class_embedding.")]
        groups = [{"params": rest}]
        if embedding:
            groups.append(
                {
                    "params": embedding,
                    "lr": self.hparams.lr if self.hparams.embedding_lr is None else self.hparams.embedding_lr,
                    "weight_decay": 0.0,
                }
            )
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = get_cosine_schedule_with_warmup(opt, self.hparams.warmup_steps, int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, directory: str | Path) -> None:
        """Write the EMA UNet and the noise schedule in diffusers' layout."""
        directory = Path(directory)
        self.ema.module.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        if self.label_sizes is not None:
            (directory / LABELS_FILE).write_text(json.dumps({"num_labels": self.label_sizes}))

    def on_fit_end(self):
        if not self.hparams.export_dir:
            return
        trained_at_least_one_step(self.trainer, self.hparams.export_dir)  # on every process: all stop
        if self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)
            self.print(f"pretrained model written to {self.hparams.export_dir}")
            notice_if_shadowed(self.hparams.export_dir)
