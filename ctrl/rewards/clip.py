"""Prompt-image rewards on a CLIP model (transformers' CLIPModel): CLIPScore and PickScore; and CLIP's image
preprocessing in torch, which every CLIP-based reward here uses so that gradients reach the pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPProcessor

from ctrl.assets import local_directory
from ctrl.dtypes import DTYPES
from ctrl.errors import SettingError, setting
from ctrl.rewards.base import Reward


class CLIPImagePreprocess(nn.Module):
    """What a CLIPImageProcessor does to a PIL image, in torch and differentiable: images ``[B, 3, H, W]`` in
    [-1, 1] -> ``pixel_values`` ``[B, 3, h, w]``: resize (bicubic, antialiased) the short side to ``size`` (or
    to ``(height, width)``), centre crop to ``crop`` (None: no crop), rescale to [0, 1], normalise.

    Args:
        size: the short side after resizing (CLIP's ``shortest_edge``), or ``(height, width)``.
        crop: ``(height, width)`` of the centre crop, or None.
        mean, std: per-channel normalisation of [0, 1] pixels.
    """

    def __init__(
        self, size: int | tuple[int, int], crop: tuple[int, int] | None, mean: Sequence[float], std: Sequence[float]
    ):
        super().__init__()
        self.size, self.crop = size, crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def of(cls, image_processor) -> CLIPImagePreprocess:
        """The preprocessing a transformers CLIPImageProcessor describes (its size, crop size, mean and std)."""
        size, crop = image_processor.size, image_processor.crop_size
        resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        crop = (crop["height"], crop["width"]) if image_processor.do_center_crop else None
        return cls(resize, crop, list(image_processor.image_mean), list(image_processor.image_std))

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if isinstance(self.size, int):  # as transformers sizes it: the long side rounded down
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            shape = (self.size, new_long) if h <= w else (new_long, self.size)
        else:
            shape = tuple(self.size)
        x = images.float()
        if shape != (h, w):
            x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)
        if self.crop is not None:
            (ch, cw), (xh, xw) = self.crop, x.shape[-2:]
            top, left = (xh - ch) // 2, (xw - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std


class CLIPScore(Reward):
    """How well each image matches its prompt: ``exp(logit_scale) * cos(image embedding, text embedding)`` of a
    CLIP model with both towers, ``[B]``; differentiable in the images (the text side has no gradient).

    The scale is the checkpoint's own, so the score is the logit CLIP's contrastive loss uses: ``100 cos`` for
    OpenAI's CLIP. The CLIPScore of torchmetrics reports ``100 max(cos, 0)``, the same number whenever the
    cosine is positive (Hessel et al.'s paper uses ``2.5 max(cos, 0)``); the clamp is left out because it would
    zero the gradient of exactly the images that match their prompt worst.

    Images are preprocessed in torch as the checkpoint's CLIPImageProcessor does (:class:`CLIPImagePreprocess`);
    prompts are tokenized by its tokenizer (truncated to its maximum length), each distinct prompt encoded once
    per call. The policy must give prompts (``StableDiffusionPolicy``): digits labels have no text.

    Args:
        model: a local directory (``CLIPModel.save_pretrained``) or a hub id in the local cache of a CLIP model;
            nothing downloads.
        processor: the directory or cached hub id of its CLIPProcessor (tokenizer and image processor);
            default: ``model``.
        dtype: dtype of the CLIP weights ("float32", "bfloat16", "float16").
    """

    differentiable = True
    #: where the weights come from, for the refusals' hints
    _model_example = _processor_example = "openai/clip-vit-large-patch14"

    def __init__(
        self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None, dtype: str = "float32"
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise SettingError(self, "dtype", f"'{dtype}' is not one of {sorted(DTYPES)}.")
        clip = self._load_model(model)
        # exp(logit_scale) read in float32: a bfloat16 logit_scale of ln 100 would put the scale 1% off
        self.register_buffer("scale", clip.logit_scale.detach().exp(), persistent=False)
        self.clip = clip.to(DTYPES[dtype])
        if processor is None:
            loaded = self._load_processor("model", model)
        else:
            loaded = self._load_processor("processor", processor)
        self.tokenizer = loaded.tokenizer
        self.preprocess = CLIPImagePreprocess.of(loaded.image_processor)
        self.requires_grad_(False)

    def _load_model(self, model: str) -> CLIPModel:
        hint = f"give a CLIP model's directory (CLIPModel.save_pretrained), e.g. a download of {self._model_example}"
        with setting(self, "model", model):
            local_directory(model, "CLIP model", hint)
        try:
            config = AutoConfig.from_pretrained(model, local_files_only=True)
            if isinstance(config, CLIPConfig):
                return CLIPModel.from_pretrained(model, config=config, dtype=torch.float32, local_files_only=True)
        except Exception as err:  # transformers raises OSError / ValueError / KeyError for absent or odd weights
            raise SettingError(
                self,
                "model",
                f"could not load a CLIP model from '{model}' ({type(err).__name__}); {hint}, or a hub id already in "
                "the local cache.",
            ) from None
        raise SettingError(
            self,
            "model",
            f"'{model}' holds a {config.model_type} model, not a CLIP model with image and text towers "
            f"(model_type clip); {hint}.",
        )

    def _load_processor(self, key: str, path: str) -> CLIPProcessor:
        try:
            return CLIPProcessor.from_pretrained(path, local_files_only=True)
        except Exception as err:  # as above
            raise SettingError(
                self,
                key,
                f"could not load a CLIPProcessor (tokenizer and image processor) from '{path}' "
                f"({type(err).__name__}); give the directory CLIPProcessor.save_pretrained wrote, e.g. a download of "
                f"{self._processor_example}.",
            ) from None

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen judge

    def image_embeds(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]`` (float32) of images ``[B, 3, H, W]`` in [-1, 1]."""
        pixels = self.preprocess(images).to(self.clip.visual_projection.weight.dtype)
        embeds = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str], device: torch.device) -> Tensor:
        """Unit-norm text embeddings ``[P, D]`` (float32) of ``prompts``, each distinct prompt encoded once."""
        distinct = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            distinct, padding=True, truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).to(device)
        pooled = self.clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        embeds = self.clip.text_projection(pooled).float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        row = {p: i for i, p in enumerate(distinct)}
        return embeds[torch.tensor([row[p] for p in prompts], device=device)]

    def forward(self, x0: Tensor, labels: Tensor | None = None, prompts: list[str] | None = None) -> Tensor:
        if prompts is None:
            raise SettingError(
                self,
                "",
                "scores each image against its prompt, but the policy's conditions have no text; use a "
                "text-to-image policy (ctrl.policy.StableDiffusionPolicy with model.policy.prompts).",
            )
        if len(prompts) != len(x0):
            raise ValueError(f"{type(self).__name__} got {len(prompts)} prompts for {len(x0)} images; give one each.")
        cos = (self.image_embeds(x0) * self.text_embeds(prompts, x0.device)).sum(-1)
        return self.scale * cos


class PickScore(CLIPScore):
    """PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences, scored as
    :class:`CLIPScore` does, ``exp(logit_scale) * cos``, with the checkpoint's own logit scale (as the authors'
    code computes it; about 20 to 23 for typical Stable Diffusion images).

    Args:
        model: ``yuvalkirstain/PickScore_v1`` (in the local cache) or a local directory of it.
        processor: its processor: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (cached) or a local directory.
        dtype: dtype of the weights.
    """

    _model_example = "yuvalkirstain/PickScore_v1"
    _processor_example = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: str = "float32",
    ):
        super().__init__(model, processor, dtype)
