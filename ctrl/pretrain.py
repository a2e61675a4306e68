"""Train a base (unconditional) diffusion model: a diffusers UNet2DModel with epsilon prediction.

This is how the shipped ``ctrl:digits-ddpm`` weights are made (configs/digits/pretrain.yaml). The
exponential moving average of the weights is exported with ``save_pretrained`` as a
DDPMPipeline-style directory (``unet/``, ``scheduler/``), which ``UNetPolicy(pretrained=...)`` and
diffusers' own ``from_pretrained`` both load.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class DiffusionPretraining(L.LightningModule):
    """Denoising score matching for a UNet2DModel.

    Args:
        sample_size, in_channels, block_out_channels, layers_per_block, down_block_types,
        up_block_types: the UNet2DModel (attention sits in its middle block).
        num_train_timesteps, beta_schedule: the DDPM noise schedule (saved with the weights).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay over the run.
        ema_decay: decay of the exported exponential moving average.
        export_dir: where the EMA model is written when fit ends.
    """

    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 2,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        ema_decay: float = 0.995,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            norm_num_groups=8, attention_head_dim=8,
        )
        # clip_sample off: the sampler's step is then exactly Gaussian in eps (DESIGN.md's KL).
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       clip_sample=False, timestep_spacing="trailing")
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.unet(xt, t).sample, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = get_cosine_schedule_with_warmup(opt, self.hparams.warmup_steps, int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, directory: str | Path) -> None:
        """Write the EMA UNet and the noise schedule in diffusers' layout."""
        directory = Path(directory)
        self.ema.module.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")

    def on_fit_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)
            self.print(f"pretrained model written to {self.hparams.export_dir}")
