"""Tiny models built locally: nothing downloads, everything runs on the CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_pretrained(directory, sample_size: int = 8, seed: int = 0) -> str:
    """A random tiny UNet2DModel and DDPM schedule saved in diffusers' layout (unet/, scheduler/)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing").save_pretrained(
        directory / "scheduler")
    return str(directory)


def make_tiny_classifier(path, num_labels: int = 10, seed: int = 0) -> str:
    from ctrl.classifier import ConvClassifier, save_classifier

    torch.manual_seed(seed)
    save_classifier(ConvClassifier(num_labels=num_labels, width=4), 1.5, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    return make_tiny_pretrained(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-clf") / "classifier.safetensors")
