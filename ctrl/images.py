"""Image conversions shared by rewards, evaluators, callbacks and the benchmark. Images are
``[N, C, H, W]`` tensors in [-1, 1]."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


#: the caption strip's colour: light grey, apart from a white image's edge
CAPTION_BACKGROUND = (232, 232, 232)


def grid_shape(n: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows * cols == n`` exactly and ``rows <= cols``."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def grid_count(n: int, limit: int) -> int:
    """How many of ``n`` images a grid of at most ``limit`` shows: the largest count whose :func:`grid_shape` has
    ``cols <= max(3, 2 * rows)``, so that the grid has no empty cell and is no long strip (7 -> 6, 11 -> 9)."""
    m = min(n, limit)
    while m > 3:
        rows, cols = grid_shape(m)
        if cols <= 2 * rows:
            return m
        m -= 1
    return m


def to_cells(images: Tensor, size: int) -> list[Image.Image]:
    """``[N, C, H, W]`` in [-1, 1] -> N RGB images whose longer side is at most ``size``: a smaller image is enlarged
    by the largest whole factor that fits (nearest neighbour, so its pixels stay sharp squares), a larger one
    shrunk to ``size`` (Lanczos)."""
    pixels = to_uint8(images)
    h, w = pixels.shape[1:3]
    longer = max(h, w)
    if longer <= size:
        factor = size // longer
        shape, resample = (w * factor, h * factor), Image.NEAREST
    else:
        shape, resample = (max(1, round(w * size / longer)), max(1, round(h * size / longer))), Image.LANCZOS
    return [to_pil(p).convert("RGB").resize(shape, resample) for p in pixels]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut at the end (marked ``...``) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped at spaces into lines of at most ``width`` pixels, at most ``max_lines`` of them."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    return [_fit(draw, line, font, width) for line in lines]


def captioned_grid(
    images: Tensor, captions: list[str], size: int = 256, border: int = 1
) -> tuple[Image.Image, dict[str, int]]:
    """Images ``[N, C, H, W]`` in [-1, 1] and a caption each -> one RGB image of N tiles, row-major in a
    :func:`grid_shape` (N) grid (every cell filled). A tile is the image (scaled as :func:`to_cells`) over a light
    grey strip with its caption in black (PIL's default font; each line of a caption, split at newlines, wrapped to
    the cell's width, two lines at most, the rest cut with ``...``), framed by ``border`` mid-grey pixels so that
    touching images stay apart. Captions drawn into the pixels survive every logger.

    Returns the grid and its layout ``{rows, cols, cell_height, cell_width, caption_height, border}``: the grid is
    ``rows * (cell_height + caption_height + 2 * border)`` pixels high, ``cols * (cell_width + 2 * border)`` wide.
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cells = to_cells(images, size)
    rows, cols = grid_shape(len(cells))
    width, height = cells[0].size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_height = 2, font.getbbox("Ag|")[3] + 3
    wrapped = [
        [line for part in caption.split("\n") for line in _wrap(measure, part, font, width - 2 * pad, 2)]
        for caption in captions
    ]
    strip = max(len(lines) for lines in wrapped) * line_height + 2 * pad
    tile_width, tile_height = width + 2 * border, height + strip + 2 * border
    grid = Image.new("RGB", (cols * tile_width, rows * tile_height), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, (cell, lines) in enumerate(zip(cells, wrapped)):
        x, y = (i % cols) * tile_width + border, (i // cols) * tile_height + border
        grid.paste(cell, (x, y))
        draw.rectangle((x, y + height, x + width - 1, y + height + strip - 1), fill=CAPTION_BACKGROUND)
        for j, line in enumerate(lines):
            draw.text((x + pad, y + height + pad + j * line_height), line, fill="black", font=font)
    layout = {"rows": rows, "cols": cols, "cell_height": height, "cell_width": width, "caption_height": strip}
    return grid, {**layout, "border": border}
