"""DiffusionPolicy over a diffusers Stable Diffusion 3 pipeline (SD 3 / 3.5): a flow-matching model whose
MMDiT transformer predicts the velocity v, prompts, classifier-free guidance, LoRA on the transformer.

A condition is a prompt, numbered as the prompt list; the datamodule draws condition numbers and the reward
scores the condition and its prompt. The chain runs on VAE latents ``[16, H/8, W/8]`` with the pipeline's
FlowMatchEulerDiscreteScheduler (its shift); the reward and the evaluator see decoded images ``[3, H, W]`` in
[-1, 1], decoded as ``StableDiffusion3Pipeline`` decodes them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from ctrl.assets import local_directory
from ctrl.dtypes import DTYPES
from ctrl.errors import SettingError, setting
from ctrl.policy.adapters import LoraNetwork, check_lora_init
from ctrl.policy.base import DiffusionPolicy
from ctrl.policy.loading import component_class, is_flow_matching, load_component
from ctrl.prompts import load_prompts

PIPELINE = "StableDiffusion3Pipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: T5, which SD3 runs without (zero T5 embeddings), as StableDiffusion3Pipeline with text_encoder_3=None
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
#: LoRA targets of diffusers' SD3 DreamBooth LoRA script (train_dreambooth_lora_sd3.py): the attention projections
#: of the image stream of every joint block (and of SD 3.5's second attention)
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
#: diffusers' default ``max_sequence_length`` of the T5 prompt (StableDiffusion3Pipeline.__call__)
MAX_SEQUENCE_LENGTH = 256


def _load(cls, path: str, component: str, **kwargs):
    return load_component(cls, path, component, PIPELINE, **kwargs)


def _has_t5(pretrained: str, local: Path | None) -> bool:
    """Whether the pipeline holds T5 (text_encoder_3): its folder in a directory; for a hub id, its model_index.json
    (from the cache) unless that names none."""
    if local is not None:
        return all((local / c).is_dir() for c in T5_COMPONENTS)
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(pretrained, local_files_only=True)
    except Exception:  # not in the cache: loading text_encoder_3 says what is wrong
        return True
    return all(index.get(c, [None])[0] is not None for c in T5_COMPONENTS)


def load_sd3_components(pretrained: str, dtype: torch.dtype, variant: str | None, t5: bool = True) -> dict:
    """The frozen components of a StableDiffusion3Pipeline directory or hub id, by their pipeline names
    (transformer, vae, text_encoder(_2, _3), tokenizer(_2, _3), scheduler); T5 (``*_3``) is None when ``t5`` is
    False or the pipeline has none. The scheduler is the pipeline's FlowMatchEulerDiscreteScheduler (its shift). A
    missing directory is a FileNotFoundError, a pipeline that cannot be used a ValueError (the policy names its
    setting)."""
    hint = f"give a directory written by {PIPELINE}.save_pretrained, or a hub id"
    local = local_directory(pretrained, "pipeline", hint)
    scheduler_class = component_class(pretrained, "scheduler")
    if scheduler_class is not None and not is_flow_matching(scheduler_class):
        raise ValueError(
            f"'{pretrained}' is not a Stable Diffusion 3 pipeline (its scheduler is {scheduler_class}, not "
            f"FlowMatchEulerDiscreteScheduler); for a Stable Diffusion 1.x/2.x pipeline use "
            "ctrl.policy.StableDiffusionPolicy."
        )
    if local is not None:
        missing = [c for c in COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise ValueError(
                f"'{pretrained}' has no {', '.join(m + '/' for m in missing)}; a Stable Diffusion 3 pipeline "
                f"directory holds {', '.join(c + '/' for c in COMPONENTS)} and optionally "
                f"{', '.join(c + '/' for c in T5_COMPONENTS)} (as {PIPELINE}.save_pretrained writes them)."
            )
    transformer_class = component_class(pretrained, "transformer")
    if transformer_class not in (None, SD3Transformer2DModel.__name__):
        raise ValueError(
            f"'{pretrained}' is a flow-matching pipeline of another kind (its transformer is {transformer_class}); "
            f"StableDiffusion3Policy runs Stable Diffusion 3 / 3.5 pipelines (SD3Transformer2DModel)."
        )
    weights = dict(torch_dtype=dtype, variant=variant)
    parts = dict(
        transformer=_load(SD3Transformer2DModel, pretrained, "transformer", **weights),
        vae=_load(AutoencoderKL, pretrained, "vae", **weights),
        text_encoder=_load(CLIPTextModelWithProjection, pretrained, "text_encoder", dtype=dtype),
        text_encoder_2=_load(CLIPTextModelWithProjection, pretrained, "text_encoder_2", dtype=dtype),
        tokenizer=_load(CLIPTokenizer, pretrained, "tokenizer"),
        tokenizer_2=_load(CLIPTokenizer, pretrained, "tokenizer_2"),
        scheduler=_load(FlowMatchEulerDiscreteScheduler, pretrained, "scheduler"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if t5 and _has_t5(pretrained, local):
        parts["text_encoder_3"] = _load(T5EncoderModel, pretrained, "text_encoder_3", dtype=dtype)
        parts["tokenizer_3"] = _load(AutoTokenizer, pretrained, "tokenizer_3")
    if parts["scheduler"].config.get("use_dynamic_shifting", False):
        raise ValueError(
            f"'{pretrained}' shifts its timesteps by the image size (use_dynamic_shifting); ctrl's sampler takes "
            "the scheduler's own grid: give a pipeline with a fixed shift (Stable Diffusion 3 / 3.5)."
        )
    for model in parts.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
            model.eval()
    return parts


class StableDiffusion3Policy(DiffusionPolicy):
    """A frozen Stable Diffusion 3 pipeline plus LoRA on its transformer.

    ``predict`` gives velocities (the scheduler is flow matching). Both the pretrained and the controlled velocity
    use classifier-free guidance with the same scale, ``v = u + s (c - u)`` (u: the empty prompt's embeddings, c:
    the chain's prompt's), as ``StableDiffusion3Pipeline`` guides; the pretrained one runs the same transformer
    with the adapters switched off.

    Args:
        pretrained: a StableDiffusion3Pipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/,
            tokenizer/, tokenizer_2/, scheduler/ and optionally text_encoder_3/, tokenizer_3/) or a hub id (from
            the local cache when offline), e.g. stabilityai/stable-diffusion-3.5-medium.
        prompts: a list of prompts, a file of one prompt per line, or ``ctrl:animals``.
        guidance_scale: classifier-free guidance scale s of every rollout (1: no guidance, one transformer call
            per model and step instead of two).
        resolution: image side in pixels (default: the transformer's sample size times the VAE's factor); must be
            divisible by the VAE's factor times the transformer's patch size.
        dtype: dtype of the frozen weights ("float32", "bfloat16", "float16"); LoRA trains in float32.
        variant: weights variant to load (e.g. "fp16"), None for the default files.
        use_t5: encode the prompts with T5 (text_encoder_3) too, when the pipeline has it; False: zero T5
            embeddings, as StableDiffusion3Pipeline with text_encoder_3=None (T5-XXL is 4.7B parameters). Either
            way the text encoders are dropped once the prompts are encoded.
        max_sequence_length: T5 tokens per prompt (the pipeline's ``max_sequence_length``, 256 by default).
        lora_rank, lora_alpha, lora_target_modules: peft LoraConfig of the transformer adapter (lora_alpha
            defaults to the rank, or to init_lora's alpha).
        lora_init: how a new adapter's A matrix starts, B being zero: "default" (peft's Kaiming-uniform) or
            "gaussian" (std 1 / rank, trl's DDPO and AlignProp); it sets the effective step of the first updates.
        init_lora: a diffusers LoRA folder to start the adapter from (what ``ctrl export`` and ExportLora write, or
            any transformer LoRA ``StableDiffusion3Pipeline.load_lora_weights`` reads) instead of zero; it must have
            rank ``lora_rank`` and exactly this transformer's ``lora_target_modules`` layers.
        lora_lr: learning rate of the adapter.
        decode_checkpointing: recompute the VAE decoder in the backward pass (reward backprop through the decoder
            otherwise holds all its activations).
    """

    def __init__(
        self,
        pretrained: str,
        prompts: str | list[str] = "ctrl:animals",
        guidance_scale: float = 7.0,
        resolution: int | None = None,
        dtype: str = "float32",
        variant: str | None = None,
        use_t5: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_init: str = "default",
        lora_lr: float = 3e-4,
        decode_checkpointing: bool = True,
        init_lora: str | None = None,
    ):
        super().__init__()
        self._check_settings(dtype, lora_rank, guidance_scale, max_sequence_length, lora_init)
        with setting(self, "prompts", prompts):
            self.prompts = load_prompts(prompts)
        with setting(self, "pretrained", pretrained):
            parts = load_sd3_components(pretrained, DTYPES[dtype], variant, use_t5)
        self.transformer, self.vae, self.scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        # The position embedding is a persistent buffer of the frozen transformer (SD 3.5 medium's: 384^2 x 1536
        # values): it comes from `pretrained` like the weights, so keep it out of ctrl's checkpoints.
        patches = self.transformer.pos_embed
        if isinstance(getattr(patches, "pos_embed", None), Tensor):
            patches.register_buffer("pos_embed", patches.pos_embed, persistent=False)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self._resolution(resolution) // self.vae_factor
        self.sample_shape = (self.transformer.config.in_channels, side, side)
        self.guidance_scale = guidance_scale
        self.num_labels = len(self.prompts)
        self.decode_checkpointing = decode_checkpointing
        self.lrs = dict(lora=lora_lr)

        # The text encoders are needed once: the prompts' embeddings are fixed, so keep those and drop them.
        with torch.no_grad():
            embeds, pooled = self._encode(parts, [""] + self.prompts, max_sequence_length)
        self.register_buffer("empty_embeds", embeds[:1], persistent=False)  # [1, L, D]
        self.register_buffer("prompt_embeds", embeds[1:], persistent=False)  # [P, L, D]
        self.register_buffer("empty_pooled", pooled[:1], persistent=False)  # [1, D']
        self.register_buffer("prompt_pooled", pooled[1:], persistent=False)  # [P, D']

        self.lora_rank = lora_rank
        examples = f"{DEFAULT_LORA_TARGETS} (attention), add_q_proj, add_k_proj, add_v_proj, to_add_out, ff.net.2"
        self.lora = LoraNetwork(self, self.transformer, "transformer", "transformer", PIPELINE, examples)
        start, alpha = self.lora.read_init(init_lora, lora_rank, lora_alpha) if init_lora else (None, None)
        self.lora_config = self.lora.add(
            lora_rank, lora_alpha or alpha or lora_rank, lora_target_modules or DEFAULT_LORA_TARGETS, lora_init
        )
        self._adapters = self.lora.switch
        if start is not None:
            self.lora.load_init(init_lora, start)

    def _check_settings(
        self, dtype: str, lora_rank: int, guidance_scale: float, max_sequence_length: int, lora_init: str
    ) -> None:
        check_lora_init(self, lora_init)
        if dtype not in DTYPES:
            raise SettingError(self, "dtype", f"'{dtype}' is not one of {sorted(DTYPES)}.")
        if lora_rank <= 0:
            raise SettingError(
                self, "lora_rank", f"{lora_rank} leaves nothing trainable; give lora_rank > 0 (the LoRA's rank)."
            )
        if guidance_scale < 1:
            raise SettingError(
                self, "guidance_scale", f"must be >= 1 (1: no classifier-free guidance), got {guidance_scale}."
            )
        if not 0 < max_sequence_length <= 512:  # StableDiffusion3Pipeline.check_inputs' bound
            raise SettingError(
                self, "max_sequence_length", f"must be in 1..512 (T5 tokens per prompt), got {max_sequence_length}."
            )

    def _resolution(self, resolution: int | None) -> int:
        """The image side in pixels: ``resolution``, or the transformer's sample size times the VAE's factor; it must
        be a multiple of that factor times the transformer's patch size, and fit its position embedding."""
        cfg = self.transformer.config
        resolution = resolution or cfg.sample_size * self.vae_factor
        step = self.vae_factor * cfg.patch_size
        if resolution <= 0 or resolution % step:
            raise SettingError(
                self,
                "resolution",
                f"{resolution} is not divisible by {step} (the VAE's downsampling factor {self.vae_factor} times the "
                f"transformer's patch size {cfg.patch_size}); use a multiple of {step} (e.g. "
                f"{resolution // step * step or step}).",
            )
        if cfg.pos_embed_max_size is not None and resolution // step > cfg.pos_embed_max_size:
            largest = cfg.pos_embed_max_size * step
            raise SettingError(
                self,
                "resolution",
                f"{resolution} is larger than this transformer's position embedding covers ({largest} pixels: "
                f"pos_embed_max_size {cfg.pos_embed_max_size} patches); use at most {largest}.",
            )
        return resolution

    @staticmethod
    def _encode(parts: dict, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds [N, L, D], pooled_prompt_embeds [N, D'])`` of ``prompts`` exactly as
        ``StableDiffusion3Pipeline.encode_prompt`` computes them (its own code, on a pipeline of these components)."""
        # imported here: diffusers' pipelines pull in every image processor of transformers (seconds)
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(**parts)
        device = parts["transformer"].pos_embed.proj.weight.device
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    def train(self, mode: bool = True):
        super().train(mode)
        self.transformer.eval()  # frozen weights: no dropout, whatever Lightning sets
        self.vae.eval()
        return self

    # -- conditions -----------------------------------------------------------------------------
    def reward_prompts(self, labels: Tensor) -> list[str]:
        """Each chain's prompt (the null label, which samples the pretrained model, has the first, as in
        ``predict``)."""
        index = torch.where(labels == self.null_label, 0, labels)
        return [self.prompts[i] for i in index.tolist()]

    def condition_name(self, c: int) -> str:
        """A readable name of condition ``c``: its prompt."""
        return self.prompts[c] if c != self.null_label else "null label"

    # -- the network ----------------------------------------------------------------------------
    def _guided_transformer(self, x: Tensor, t: Tensor, prompts: Tensor, adapters: bool) -> Tensor:
        """Classifier-free-guided velocity ``[B, C, h, w]`` of the transformer with or without the adapters."""
        # Set inside the call so that checkpoint's recomputation sees the same adapter state.
        self._adapters.set(adapters)
        # the first layer's dtype: diffusers' `transformer.dtype` walks every parameter on each call
        b, dtype = x.shape[0], self.transformer.pos_embed.proj.weight.dtype
        states, pooled = self.prompt_embeds[prompts], self.prompt_pooled[prompts]
        xs = x
        if self.guidance_scale > 1:  # one call for both branches; the unconditional one has the empty prompt
            states = torch.cat([self.empty_embeds.expand(b, -1, -1), states])
            pooled = torch.cat([self.empty_pooled.expand(b, -1), pooled])
            xs, t = torch.cat([x, x]), (torch.cat([t, t]) if t.dim() else t)
        # the pipeline's timestep: the scheduler's float32 sigma * 1000, one per row
        timestep = t.to(device=x.device, dtype=torch.float32).expand(xs.shape[0])
        v = self.transformer(
            hidden_states=xs.to(dtype),
            timestep=timestep,
            encoder_hidden_states=states.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )[0].float()
        if self.guidance_scale == 1:
            return v
        uncond, conditional = v.chunk(2)
        return uncond + self.guidance_scale * (conditional - uncond)

    def predict(self, x: Tensor, t: Tensor, labels: Tensor, control_scale: float = 1.0, pretrained: bool = True):
        active = labels != self.null_label  # the null label samples the pretrained model (with the first prompt)
        prompts = torch.where(active, labels, 0)
        if not pretrained and control_scale == 1 and bool(active.all()):  # the policy's own call is all it takes
            return self._guided_transformer(x, t, prompts, adapters=True), None
        try:
            v_pre = self._guided_transformer(x, t, prompts, adapters=False)
        finally:
            # peft also switches requires_grad off while adapters are disabled: always leave them on
            self._adapters.set(True)
        if not active.any() or control_scale == 0:
            return v_pre, v_pre
        v_theta = self._guided_transformer(x, t, prompts, adapters=True)
        weight = control_scale * active.to(x.dtype).view(-1, 1, 1, 1)
        return v_pre + weight * (v_theta - v_pre), v_pre

    def _decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        latents = latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor  # as StableDiffusion3Pipeline
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents ``[B, 16, h, w]`` -> images ``[B, 3, H, W]`` in [-1, 1] through the frozen VAE decoder."""
        if self.decode_checkpointing and torch.is_grad_enabled() and x0.requires_grad:
            return checkpoint(self._decode, x0, use_reentrant=False)
        return self._decode(x0)

    def networks(self) -> list[nn.Module]:
        return [self.transformer]

    def param_groups(self) -> list[dict]:
        return [dict(name="lora", params=self.lora.parameters(), lr=self.lrs["lora"])]

    # -- export ---------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write the LoRA as ``StableDiffusion3Pipeline.load_lora_weights(directory)`` loads it
        (``pytorch_lora_weights.safetensors``, transformer layers with their LoraConfig as metadata)."""
        from diffusers import StableDiffusion3Pipeline

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers, metadata = self.lora.export_layers()
        StableDiffusion3Pipeline.save_lora_weights(
            directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
        return directory
