"""Rewards on RGB images ``[B, 3, H, W]`` in [-1, 1]: JPEG (in)compressibility and the LAION aesthetic score."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPVisionModelWithProjection

from ctrl.dtypes import DTYPES
from ctrl.errors import SettingError
from ctrl.images import jpeg_kilobytes
from ctrl.rewards.base import Reward
from ctrl.rewards.clip import CLIPImagePreprocess


class JpegCompressibility(Reward):
    """``-kB`` of the JPEG at quality 95 (``incompressible: true``: ``+kB``), as DDPO's compressibility tasks.

    Not differentiable: use it with PPO, ContinuousTimePG or RAFT.
    """

    differentiable = False

    def __init__(self, quality: int = 95, incompressible: bool = False):
        super().__init__()
        if not 1 <= quality <= 100:
            raise SettingError(self, "quality", f"must lie in 1..100, got {quality}.")
        self.quality, self.sign = quality, 1.0 if incompressible else -1.0

    def forward(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.sign * jpeg_kilobytes(x0, self.quality)


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's head: an MLP on the L2-normalised CLIP image embedding -> score ``[B]``.

    Layer names follow the released ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0``, ``layers.2``,
    ``layers.4``, ``layers.6``, ``layers.7``), so that file loads as it is.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def _load_state(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticScore(Reward):
    """The LAION aesthetic predictor (v1, as DDPO and AlignProp use it): a CLIP ViT-L/14 image embedding,
    L2-normalised, through :class:`AestheticMLP`. Differentiable (AlignProp backpropagates through it).

    Args:
        clip_model: a local directory or hub id of a CLIP model (``CLIPModel`` or
            ``CLIPVisionModelWithProjection`` weights, e.g. openai/clip-vit-large-patch14).
        mlp_path: the MLP's weights (``.pth`` state dict as released, or ``.safetensors``).
        dtype: dtype of the CLIP weights ("float32", "bfloat16", "float16").
    """

    differentiable = True
    MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, clip_model: str, mlp_path: str, dtype: str = "float32"):
        super().__init__()

        if dtype not in DTYPES:
            raise SettingError(self, "dtype", f"'{dtype}' is not one of {sorted(DTYPES)}.")
        if not Path(mlp_path).is_file():
            raise SettingError(
                self,
                "mlp_path",
                f"no aesthetic MLP weights at '{mlp_path}'; download sac+logos+ava1-l14-linearMSE.pth (LAION "
                "improved-aesthetic-predictor) on a machine with internet and give its path.",
            )
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(
                clip_model, dtype=DTYPES[dtype], local_files_only=True
            )
        except Exception as err:  # transformers raises OSError / ValueError for absent or wrong weights
            raise SettingError(
                self,
                "clip_model",
                f"could not load CLIP image weights from '{clip_model}' ({type(err).__name__}); give a local "
                "directory (or a hub id already in the cache) of a CLIP model such as openai/clip-vit-large-patch14.",
            ) from None
        dim = self.clip.config.projection_dim
        self.mlp = AestheticMLP(dim)
        try:
            self.mlp.load_state_dict(_load_state(mlp_path))
        except (RuntimeError, KeyError, ValueError) as err:
            raise SettingError(
                self,
                "mlp_path",
                f"'{mlp_path}' is not an aesthetic MLP for {dim}-d CLIP embeddings ({str(err).splitlines()[0]}).",
            ) from None
        size = self.clip.config.image_size
        self.preprocess = CLIPImagePreprocess(size, (size, size), self.MEAN, self.STD)
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen judge

    def forward(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        embeds = self.clip(pixel_values=self.preprocess(x0).to(self.clip.dtype)).image_embeds.float()
        return self.mlp(embeds / embeds.norm(dim=-1, keepdim=True))
