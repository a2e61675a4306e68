"""DiffusionPolicy over a diffusers Stable Diffusion pipeline: latent chains, prompts, classifier-free
guidance, LoRA on the UNet, optionally the first paper's class embedding.

A condition is a (prompt, class) pair, numbered ``c = prompt * K + class`` with ``K = max(num_classes, 1)``;
the datamodule draws condition numbers and the reward scores the class (``reward_labels``), or the
condition itself when there are no classes. The chain runs on VAE latents ``[4, H/8, W/8]``; the
reward and the evaluator see decoded images ``[3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from ctrl.assets import local_directory
from ctrl.dtypes import DTYPES
from ctrl.errors import SettingError, setting
from ctrl.policy.adapters import LoraNetwork, check_lora_init
from ctrl.policy.base import DiffusionPolicy
from ctrl.policy.loading import component_class, is_flow_matching, load_component
from ctrl.prompts import load_prompts

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: LoRA targets of diffusers' text-to-image LoRA script (attention projections of the UNet).
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: the class embedding's file beside the LoRA in an export
CLASS_EMBEDDING = "class_embedding.safetensors"


def _load(cls, path: str, component: str, **kwargs):
    return load_component(cls, path, component, "StableDiffusionPipeline", **kwargs)


def load_pipeline_components(pretrained: str, dtype: torch.dtype, variant: str | None):
    """``(unet, vae, text_encoder, tokenizer, scheduler)`` of a StableDiffusionPipeline directory or hub id,
    frozen; the scheduler is DDIM with the pipeline's noise schedule. A missing directory is a
    FileNotFoundError, a pipeline that cannot be used a ValueError (the policy names its setting)."""

    hint = "give a directory written by StableDiffusionPipeline.save_pretrained, or a hub id"
    local = local_directory(pretrained, "pipeline", hint)
    scheduler_class = component_class(pretrained, "scheduler")
    if is_flow_matching(scheduler_class):
        raise ValueError(
            f"'{pretrained}' is a flow-matching pipeline (its scheduler is {scheduler_class}, as Stable Diffusion "
            "3's); StableDiffusionPolicy runs Stable Diffusion 1.x/2.x pipelines: use "
            "ctrl.policy.StableDiffusion3Policy for it."
        )
    if local is not None:
        missing = [c for c in COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise ValueError(
                f"'{pretrained}' has no {', '.join(m + '/' for m in missing)}; "
                f"a Stable Diffusion pipeline directory holds {', '.join(c + '/' for c in COMPONENTS)} "
                "(as StableDiffusionPipeline.save_pretrained writes them)."
            )
    weights = dict(torch_dtype=dtype, variant=variant)
    unet = _load(UNet2DConditionModel, pretrained, "unet", **weights)
    vae = _load(AutoencoderKL, pretrained, "vae", **weights)
    text_encoder = _load(CLIPTextModel, pretrained, "text_encoder", dtype=dtype)
    tokenizer = _load(CLIPTokenizer, pretrained, "tokenizer")
    scheduler = _load(DDIMScheduler, pretrained, "scheduler")
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"'{pretrained}' predicts '{scheduler.config.prediction_type}'; ctrl's "
            "sampler needs an epsilon-prediction pipeline (Stable Diffusion 1.x, 2.x-base)."
        )
    if unet.config.in_channels != vae.config.latent_channels or unet.config.get("addition_embed_type"):
        raise ValueError(
            f"'{pretrained}' is not a text-to-image pipeline of the Stable "
            "Diffusion 1.x/2.x kind (its UNet takes extra inputs: inpainting or SDXL); give one whose "
            "UNet takes only the VAE latents and the text embeddings."
        )
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
    return unet, vae, text_encoder, tokenizer, scheduler


class StableDiffusionPolicy(DiffusionPolicy):
    """A frozen Stable Diffusion pipeline plus LoRA on its UNet (and optionally a class embedding).

    Both the pretrained and the controlled noise predictions use classifier-free guidance with the
    same scale, ``eps = u + s (c - u)`` (u: empty prompt, c: the chain's prompt), as the papers'
    rollouts do; the pretrained one runs the same UNet with the adapters switched off and the null class.

    Args:
        pretrained: a StableDiffusionPipeline directory (unet/, vae/, text_encoder/, tokenizer/,
            scheduler/) or a hub id (from the local cache when offline).
        prompts: a list of prompts, a file of one prompt per line, or ``ctrl:animals``.
        num_classes: classes of conditional control (the first paper): a zero-initialised class
            embedding added to the UNet's time embedding, with a null class (index num_classes) for
            the unconditional branch; 0 for reward fine-tuning on prompts alone.
        guidance_scale: classifier-free guidance scale s of every rollout (1: no guidance, one
            UNet call per model and step instead of two).
        resolution: image side in pixels (default: the UNet's sample size times the VAE's factor);
            must be divisible by the VAE's factor.
        dtype: dtype of the frozen weights ("float32", "bfloat16", "float16"); LoRA and the class
            embedding train in float32.
        variant: weights variant to load (e.g. "fp16"), None for the default files.
        lora_rank, lora_alpha, lora_target_modules: peft LoraConfig of the UNet adapter
            (lora_rank 0: no LoRA; lora_alpha defaults to the rank, or to init_lora's alpha).
        lora_init: how a new adapter's A matrix starts, B being zero: "default" (peft's Kaiming-uniform) or
            "gaussian" (std 1 / rank, trl's DDPO and AlignProp); it sets the effective step of the first updates.
        init_lora: a diffusers LoRA folder to start the adapter from (what ``ctrl export`` and ExportLora write,
            or any UNet LoRA ``StableDiffusionPipeline.load_lora_weights`` reads) instead of zero; it must have
            rank ``lora_rank`` and exactly this UNet's ``lora_target_modules`` layers. Its
            ``class_embedding.safetensors``, if there, starts the class embedding (num_classes > 0).
        lora_lr, embedding_lr: learning rates of the adapter and of the class embedding.
        decode_checkpointing: recompute the VAE decoder in the backward pass (reward backprop through
            the decoder otherwise holds all its activations).
    """

    def __init__(
        self,
        pretrained: str,
        prompts: str | list[str] = "ctrl:animals",
        num_classes: int = 0,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        dtype: str = "float32",
        variant: str | None = None,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_init: str = "default",
        lora_lr: float = 3e-4,
        embedding_lr: float = 1e-2,
        decode_checkpointing: bool = True,
        init_lora: str | None = None,
    ):
        super().__init__()
        self._check_settings(dtype, num_classes, lora_rank, guidance_scale, lora_init)
        with setting(self, "prompts", prompts):
            self.prompts = load_prompts(prompts)
        with setting(self, "pretrained", pretrained):
            self.unet, self.vae, text_encoder, tokenizer, self.scheduler = load_pipeline_components(
                pretrained, DTYPES[dtype], variant
            )
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self._resolution(resolution) // self.vae_factor
        self.sample_shape = (self.unet.config.in_channels, side, side)
        self.num_classes, self.guidance_scale = num_classes, guidance_scale
        self.num_labels = len(self.prompts) * max(num_classes, 1)
        self.decode_checkpointing = decode_checkpointing
        self.lrs = dict(lora=lora_lr, embedding=embedding_lr)

        # The text encoder is needed once: the prompts' embeddings are fixed, so keep those and drop it.
        with torch.no_grad():
            embeds = self._encode(text_encoder, tokenizer, [""] + self.prompts)
        self.register_buffer("empty_embeds", embeds[:1], persistent=False)  # [1, L, D]
        self.register_buffer("prompt_embeds", embeds[1:], persistent=False)  # [P, L, D]

        if num_classes > 0:
            dim = self.unet.time_embedding.linear_2.out_features
            # padding_idx: the null row stays zero and never receives a gradient (the paper zeroes it).
            self.unet.class_embedding = nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
            nn.init.zeros_(self.unet.class_embedding.weight)
        self.lora_rank = lora_rank
        examples = f"{DEFAULT_LORA_TARGETS} (attention) or proj_in, proj_out, ff.net.2, conv1, conv2"
        self.lora = LoraNetwork(self, self.unet, "UNet", "unet", "StableDiffusionPipeline", examples)
        start, alpha = self.lora.read_init(init_lora, lora_rank, lora_alpha) if init_lora else (None, None)
        if lora_rank > 0:
            targets = lora_target_modules or DEFAULT_LORA_TARGETS
            self.lora_config = self.lora.add(lora_rank, lora_alpha or alpha or lora_rank, targets, lora_init)
            self._adapters = self.lora.switch
        if start is not None:
            self._load_init_lora(init_lora, start)
        if num_classes > 0:
            self.unet.class_embedding.requires_grad_(True)  # peft freezes all but the adapters

    def _check_settings(
        self, dtype: str, num_classes: int, lora_rank: int, guidance_scale: float, lora_init: str
    ) -> None:
        check_lora_init(self, lora_init)
        if dtype not in DTYPES:
            raise SettingError(self, "dtype", f"'{dtype}' is not one of {sorted(DTYPES)}.")
        if num_classes < 0:
            raise SettingError(self, "num_classes", f"must be >= 0 (0: prompts only), got {num_classes}.")
        if lora_rank < 0 or (lora_rank == 0 and num_classes == 0):
            raise SettingError(
                self,
                "lora_rank",
                f"{lora_rank} leaves nothing trainable; give lora_rank > 0 (or num_classes > 0 for a class "
                "embedding).",
            )
        if guidance_scale < 1:
            raise SettingError(
                self, "guidance_scale", f"must be >= 1 (1: no classifier-free guidance), got {guidance_scale}."
            )

    def _resolution(self, resolution: int | None) -> int:
        """The image side in pixels: ``resolution``, or the UNet's sample size times the VAE's factor; it must be
        a multiple of that factor."""
        size = self.unet.config.sample_size
        resolution = resolution or (size if isinstance(size, int) else size[0]) * self.vae_factor
        if resolution <= 0 or resolution % self.vae_factor:
            raise SettingError(
                self,
                "resolution",
                f"{resolution} is not divisible by the VAE's downsampling factor {self.vae_factor}; use a multiple "
                f"of {self.vae_factor} (e.g. {resolution // self.vae_factor * self.vae_factor or self.vae_factor}).",
            )
        return resolution

    @staticmethod
    def _encode(text_encoder, tokenizer, prompts: list[str]) -> Tensor:
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids)[0]

    def _load_init_lora(self, directory: str, layers: dict[str, Tensor]) -> None:
        """Copy ``layers`` (peft names, as :func:`read_diffusers_lora` gives them) into the adapter, refused unless
        they are exactly its layers; and the class embedding beside them, if any."""
        self.lora.load_init(directory, layers)
        path = Path(directory) / CLASS_EMBEDDING
        if self.num_classes > 0 and path.is_file():
            try:
                weight = load_file(str(path))["weight"]
            except Exception as err:  # safetensors' own error, or no "weight" in the file
                raise SettingError(
                    self, "init_lora", f"'{path}' is not a readable class embedding ({err!r})."
                ) from None
            own_weight = self.unet.class_embedding.weight
            if weight.shape != own_weight.shape:
                raise SettingError(
                    self,
                    "init_lora",
                    f"'{path}' is a class embedding of shape {list(weight.shape)} but this policy's is "
                    f"{list(own_weight.shape)} (num_classes {self.num_classes} and the null class).",
                )
            with torch.no_grad():
                own_weight.copy_(weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()  # frozen weights: no dropout, whatever Lightning sets
        self.vae.eval()
        return self

    # -- conditions -----------------------------------------------------------------------------
    @property
    def num_reward_labels(self) -> int:
        return self.num_classes if self.num_classes > 0 else self.num_labels

    def prompt_index(self, labels: Tensor | int) -> Tensor | int:
        return labels // max(self.num_classes, 1)

    def reward_labels(self, labels: Tensor | int) -> Tensor | int:
        return labels % self.num_classes if self.num_classes > 0 else labels

    def reward_prompts(self, labels: Tensor) -> list[str]:
        """Each chain's prompt (the null label, which samples the pretrained model, has the first, as in ``eps``)."""
        index = torch.where(labels == self.null_label, 0, self.prompt_index(labels))
        return [self.prompts[i] for i in index.tolist()]

    def condition_name(self, c: int) -> str:
        """A readable name of condition ``c``: its prompt, and its class when there are classes."""
        prompt = self.prompts[self.prompt_index(c)]
        return f"{prompt} | class {self.reward_labels(c)}" if self.num_classes > 0 else prompt

    # -- the network ----------------------------------------------------------------------------
    def _guided_unet(self, x: Tensor, t: Tensor, prompts: Tensor, classes: Tensor | None, adapters: bool) -> Tensor:
        """Classifier-free-guided eps ``[B, C, h, w]`` of the UNet with or without the adapters."""
        if self.lora_rank > 0:
            # Set inside the call so that checkpoint's recomputation sees the same adapter state.
            self._adapters.set(adapters)
        cond = self.prompt_embeds[prompts]
        # the first layer's dtype: diffusers' `unet.dtype` walks every parameter on each call
        b, dtype = x.shape[0], self.unet.conv_in.weight.dtype
        if self.guidance_scale == 1:
            states, xs, cls = cond, x, classes
        else:  # one call for both branches; the unconditional one has the empty prompt and the null class
            states = torch.cat([self.empty_embeds.expand(b, -1, -1), cond])
            xs, t = torch.cat([x, x]), (torch.cat([t, t]) if t.dim() else t)
            cls = None if classes is None else torch.cat([torch.full_like(classes, self.num_classes), classes])
        kwargs = {} if cls is None else {"class_labels": cls}
        eps = self.unet(xs.to(dtype), t, encoder_hidden_states=states, **kwargs).sample.float()
        if self.guidance_scale == 1:
            return eps
        uncond, conditional = eps.chunk(2)
        return uncond + self.guidance_scale * (conditional - uncond)

    def predict(self, x: Tensor, t: Tensor, labels: Tensor, control_scale: float = 1.0, pretrained: bool = True):
        active = labels != self.null_label  # the null label samples the pretrained model (with the first prompt)
        prompts = torch.where(active, self.prompt_index(labels), 0)
        null_classes = torch.full_like(labels, self.num_classes) if self.num_classes > 0 else None
        classes = torch.where(active, self.reward_labels(labels), self.num_classes) if self.num_classes > 0 else None
        if not pretrained and control_scale == 1 and bool(active.all()):  # the policy's own call is all it takes
            return self._guided_unet(x, t, prompts, classes, adapters=True), None
        try:
            eps_pre = self._guided_unet(x, t, prompts, null_classes, adapters=False)
        finally:
            if self.lora_rank > 0:
                # peft also switches requires_grad off while adapters are disabled: always leave them on
                self._adapters.set(True)
        if not active.any() or control_scale == 0:
            return eps_pre, eps_pre
        eps_theta = self._guided_unet(x, t, prompts, classes, adapters=True)
        weight = control_scale * active.to(x.dtype).view(-1, 1, 1, 1)
        return eps_pre + weight * (eps_theta - eps_pre), eps_pre

    def _decode(self, latents: Tensor) -> Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents ``[B, 4, h, w]`` -> images ``[B, 3, H, W]`` in [-1, 1] through the frozen VAE decoder."""
        if self.decode_checkpointing and torch.is_grad_enabled() and x0.requires_grad:
            return checkpoint(self._decode, x0, use_reentrant=False)
        return self._decode(x0)

    def networks(self) -> list[nn.Module]:
        return [self.unet]

    def param_groups(self) -> list[dict]:
        groups = []
        if self.lora_rank > 0:
            groups.append(dict(name="lora", params=self.lora.parameters(), lr=self.lrs["lora"]))
        if self.num_classes > 0:
            groups.append(
                dict(name="embedding", params=list(self.unet.class_embedding.parameters()), lr=self.lrs["embedding"])
            )
        return groups

    # -- export ---------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write the LoRA as ``StableDiffusionPipeline.load_lora_weights(directory)`` loads it
        (``pytorch_lora_weights.safetensors``), and the class embedding, if any, as
        ``class_embedding.safetensors`` (``[num_classes + 1, D]``, the last row the null class)."""
        # imported here: diffusers' pipelines pull in every image processor of transformers (seconds, and
        # warnings about torchvision) for this one method
        from diffusers import StableDiffusionPipeline

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora_rank > 0:
            layers, metadata = self.lora.export_layers()
            StableDiffusionPipeline.save_lora_weights(
                directory, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
            )
        if self.num_classes > 0:
            save_file(
                {"weight": self.unet.class_embedding.weight.detach().cpu().contiguous()},
                str(directory / CLASS_EMBEDDING),
            )
        return directory
