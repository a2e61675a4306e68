"""Image conversions shared by rewards, evaluators, callbacks and the benchmark. Images are
``[N, C, H, W]`` tensors in [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(pixels: np.ndarray) -> Image.Image:
    """One ``[H, W, C]`` uint8 array -> a PIL image (grey for one channel)."""
    return Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image saved as a JPEG at ``quality``, ``[B]`` (DDPO's measure)."""
    sizes = []
    for pixels in to_uint8(images):
        buffer = io.BytesIO()
        to_pil(pixels).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def image_grid(images: Tensor, rows: int, border: int = 1) -> Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> one ``[C, rows*(H+2b), cols*(W+2b)]`` image in [0, 1] (row-major, as
    TensorBoard's ``add_image`` takes it), each cell framed by a mid-grey border of ``b`` pixels so that touching
    digits stay apart; empty cells are black."""
    images = torch.nn.functional.pad(images.clamp(-1, 1), (border,) * 4, value=0.0)
    n, c, h, w = images.shape
    cols = (n + rows - 1) // rows
    padded = torch.cat([images, images.new_full((rows * cols - n, c, h, w), -1.0)])
    grid = padded.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
    return ((grid.clamp(-1, 1) + 1) / 2).cpu()


def grid_image(images: Tensor, rows: int, scale: int = 1) -> Image.Image:
    """:func:`image_grid` as a PIL image, each pixel enlarged ``scale`` times (nearest neighbour)."""
    pixels = (image_grid(images, rows).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = to_pil(pixels)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
