"""DiffusionPolicy over a diffusers UNet2DModel (pixel space, e.g. the digits default)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from peft import LoraConfig
from torch import Tensor, nn

from ctrl.assets import local_directory, resolve_path
from ctrl.errors import SettingError, setting
from ctrl.policy.adapters import AdapterSwitch
from ctrl.policy.base import DiffusionPolicy


class _AdapterUNet2DModel(UNet2DModel, PeftAdapterMixin):
    """UNet2DModel has no ``add_adapter``; diffusers' PeftAdapterMixin gives it LoRA through peft."""


def _load_scheduler(path: str) -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """The model's own flow-matching scheduler, or a DDIM scheduler on its DDPM/DDIM noise schedule."""
    config = DDIMScheduler.load_config(path, subfolder="scheduler")
    if config.get("_class_name", "").startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config)


def load_pretrained_unet(pretrained: str) -> tuple[UNet2DModel, DDIMScheduler | FlowMatchEulerDiscreteScheduler]:
    """Load a diffusers UNet2DModel and its noise schedule from a directory or hub id.

    ``pretrained`` is a DDPMPipeline-style directory (``unet/`` and ``scheduler/``, as
    ``save_pretrained`` writes them), a bare UNet directory (the default schedule is then used), a
    hub id, or ``ctrl:<name>`` for weights shipped with ctrl. A missing directory is a FileNotFoundError, unreadable
    or unsuitable weights a ValueError (the class whose setting gave ``pretrained`` names it: ``errors.setting``).
    """
    path = resolve_path(pretrained)
    hint = "give a directory written by diffusers' save_pretrained (unet/, scheduler/), a hub id, or ctrl:digits-ddpm"
    local = local_directory(path, "model", hint)
    if local is not None:
        subfolder = "unet" if (local / "unet").is_dir() else None
        has_scheduler = (local / "scheduler").is_dir()
    else:  # a hub id: diffusers resolves it (from the local cache when offline)
        subfolder, has_scheduler = "unet", True
    try:
        unet = _AdapterUNet2DModel.from_pretrained(path, subfolder=subfolder)
        scheduler = (
            _load_scheduler(path)
            if has_scheduler
            else DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
        )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors
        raise ValueError(
            f"could not load a diffusers UNet2DModel from '{pretrained}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check the path, or remake the weights "
            "(README: 'How the shipped weights were made')."
        ) from None
    if unet.config.get("class_embed_type") is not None or unet.config.get("num_class_embeds"):
        raise ValueError(
            f"'{pretrained}' is already class-conditional; ctrl expects an "
            "unconditional pretrained UNet to add the control to."
        )
    unet.requires_grad_(False)
    unet.eval()
    return unet, scheduler


class ResidualControlHead(nn.Module):
    """A small convolutional correction u(x_t, eps_pre, y, t) added to the pretrained eps.

    Inputs: x_t and eps_pre ``[B, C, H, W]`` plus two pixel-coordinate channels; a label embedding
    and a timestep-bucket embedding of width ``width`` are added to the features. The output
    convolution is zero-initialised, so the head starts as the pretrained model exactly.
    """

    def __init__(self, channels: int, num_labels: int, num_buckets: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2 * channels + 2, width // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
        )
        self.label_embedding = nn.Embedding(num_labels + 1, width)
        self.step_embedding = nn.Embedding(num_buckets, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, eps_pre: Tensor, labels: Tensor, bucket: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        feats = self.features(torch.cat([x, eps_pre, ys, xs], 1))
        cond = self.label_embedding(labels) + self.step_embedding(bucket).expand(b, -1)
        return self.out(nn.functional.silu(feats + cond[:, :, None, None]))


class UNetPolicy(DiffusionPolicy):
    """A frozen pretrained UNet2DModel plus the trainable control chosen by config.

    Trainable parts (any combination; each starts at zero, so the policy starts as the pretrained model):
      - ``label_embedding``: the first paper's form, an embedding of the label added to the UNet's
        time embedding (``num_labels + 1`` rows; the last is the null label, fixed at zero).
      - ``lora_rank > 0``: LoRA adapters on the UNet (peft), disabled for the pretrained reference.
      - ``step_bias``: a per-label, per-timestep-bucket image added to eps.
      - ``residual_head``: :class:`ResidualControlHead`, added to eps.
    docs/digits-study.md records which of these learn the label on digits (the shipped config uses one
    that does).

    Args:
        pretrained: see :func:`load_pretrained_unet`.
        num_labels: size of the label set (the null label is extra).
        num_buckets: timestep buckets for the step bias and the head's step embedding; a bucket is
            ``t * num_buckets // num_train_timesteps``, so any sampling grid can be used.
        embedding_lr, lora_lr, bias_lr, head_lr: learning rate of each part.
        lora_alpha, lora_target_modules: LoRA settings (peft LoraConfig).
    """

    def __init__(
        self,
        pretrained: str = "ctrl:digits-ddpm",
        num_labels: int = 10,
        label_embedding: bool = True,
        lora_rank: int = 0,
        step_bias: bool = False,
        residual_head: bool = False,
        num_buckets: int = 10,
        head_width: int = 32,
        embedding_lr: float = 1e-2,
        lora_lr: float = 1e-3,
        bias_lr: float = 1e-2,
        head_lr: float = 2e-3,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
    ):
        super().__init__()
        self._check_settings(num_labels, label_embedding, lora_rank, step_bias, residual_head)
        with setting(self, "pretrained", pretrained):
            self.unet, self.scheduler = load_pretrained_unet(pretrained)
        self.num_labels = num_labels
        cfg = self.unet.config
        self.sample_shape = (
            (cfg.in_channels, cfg.sample_size, cfg.sample_size)
            if isinstance(cfg.sample_size, int)
            else (cfg.in_channels, *cfg.sample_size)
        )
        self.num_buckets = num_buckets
        self.lrs = dict(embedding=embedding_lr, lora=lora_lr, bias=bias_lr, head=head_lr)
        self.label_embedding = label_embedding
        if label_embedding:
            dim = self.unet.time_embedding.linear_2.out_features
            # padding_idx: the null row stays zero and never receives a gradient.
            self.unet.class_embedding = nn.Embedding(num_labels + 1, dim, padding_idx=num_labels)
            nn.init.zeros_(self.unet.class_embedding.weight)
            self.unet.register_to_config(num_class_embeds=num_labels + 1)
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha or lora_rank, lora_target_modules)
            if label_embedding:  # peft freezes everything but the adapters; the embedding trains too
                self.unet.class_embedding.requires_grad_(True)
        self.step_bias = (
            nn.Parameter(torch.zeros(num_labels + 1, num_buckets, *self.sample_shape)) if step_bias else None
        )
        self.head = (
            ResidualControlHead(self.sample_shape[0], num_labels, num_buckets, head_width) if residual_head else None
        )

    def _check_settings(self, num_labels, label_embedding, lora_rank, step_bias, residual_head) -> None:
        if num_labels < 1:
            raise SettingError(self, "num_labels", f"must be at least 1, got {num_labels}.")
        if not (label_embedding or lora_rank > 0 or step_bias or residual_head):
            raise SettingError(
                self,
                "",
                "nothing is trainable; enable at least one of label_embedding, lora_rank > 0, step_bias, "
                "residual_head.",
            )

    def _add_lora(self, rank: int, alpha: float, target_modules: list[str] | None) -> None:

        targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
        names = {n.rsplit(".", 1)[-1] for n, _ in self.unet.named_modules()} | {
            n for n, _ in self.unet.named_modules()
        }
        missing = [m for m in targets if not any(n.endswith(m) for n in names)]
        if missing:
            raise SettingError(
                self,
                "lora_target_modules",
                f"{missing} match no module of the UNet; name Linear/Conv2d modules such as to_q, to_k, to_v, "
                "to_out.0, conv1, conv2.",
            )
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True))
        self._adapters = AdapterSwitch(self.unet)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()  # the UNet has no dropout/norm statistics to train; keep it deterministic
        return self

    def _bucket(self, t: Tensor) -> Tensor:
        return (
            (t.long() * self.num_buckets // self.scheduler.config.num_train_timesteps)
            .clamp(0, self.num_buckets - 1)
            .reshape(-1)
        )

    def _unet(self, x: Tensor, t: Tensor, labels: Tensor | None, adapters: bool) -> Tensor:
        if self.lora_rank > 0:
            # Set inside the call so that checkpoint's recomputation sees the same adapter state.
            self._adapters.set(adapters)
        kwargs = {"class_labels": labels} if self.label_embedding else {}
        return self.unet(x, t, **kwargs).sample

    def predict(self, x: Tensor, t: Tensor, labels: Tensor, control_scale: float = 1.0, pretrained: bool = True):
        null = torch.full_like(labels, self.null_label)
        own = (self.lora_rank > 0 or self.label_embedding) and self.head is None  # eps without eps_pre's call
        if own and not pretrained and control_scale == 1 and bool((labels != self.null_label).all()):
            eps = self._unet(x, t, labels, adapters=self.lora_rank > 0)
            bias = 0.0 if self.step_bias is None else self.step_bias[labels, self._bucket(t).expand_as(labels)]
            return eps + bias, None
        if self.lora_rank > 0:
            eps_pre = self._unet(x, t, null, adapters=False)
            if control_scale == 0:  # the pretrained model alone; adapters back on (peft froze them while off)
                self._adapters.set(True)
                return eps_pre, eps_pre
            eps_theta = self._unet(x, t, labels, adapters=True)
        elif self.label_embedding:  # one batched call for both branches
            t2 = torch.cat([t, t]) if t.dim() else t
            eps_theta, eps_pre = self._unet(torch.cat([x, x]), t2, torch.cat([labels, null]), False).chunk(2)
        else:
            eps_pre = self._unet(x, t, None, False)
            eps_theta = eps_pre
        bucket = self._bucket(t)
        correction = eps_theta - eps_pre
        if self.step_bias is not None:
            correction = correction + self.step_bias[labels, bucket.expand_as(labels)]
        if self.head is not None:
            correction = correction + self.head(x, eps_pre, labels, bucket)
        # The null label is the pretrained model exactly, whatever the trainable parts have learned.
        active = (labels != self.null_label).to(x.dtype).view(-1, 1, 1, 1)
        return eps_pre + (control_scale * active) * correction, eps_pre

    def networks(self) -> list[nn.Module]:
        return [self.unet] if self.head is None else [self.unet, self.head]

    def param_groups(self) -> list[dict]:
        groups = []
        if self.label_embedding:
            groups.append(
                dict(name="embedding", params=list(self.unet.class_embedding.parameters()), lr=self.lrs["embedding"])
            )
        if self.lora_rank > 0:
            lora = [p for n, p in self.unet.named_parameters() if "lora_" in n]
            groups.append(dict(name="lora", params=lora, lr=self.lrs["lora"]))
        if self.step_bias is not None:
            groups.append(dict(name="bias", params=[self.step_bias], lr=self.lrs["bias"]))
        if self.head is not None:
            groups.append(dict(name="head", params=list(self.head.parameters()), lr=self.lrs["head"]))
        return groups
