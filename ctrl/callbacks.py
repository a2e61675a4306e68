"""Callbacks: writing `ctrl predict` samples as a PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from ctrl.module import image_grid


class PredictionGrid(BasePredictionWriter):
    """Writes the samples of ``ctrl predict`` as one PNG: a row per requested label.

    Args:
        path: the PNG file to write (its folder is created).
        scale: pixel upscaling of the PNG (nearest neighbour), so small images stay visible.
    """

    def __init__(self, path: str = "samples.png", scale: int = 4):
        super().__init__(write_interval="epoch")
        self.path, self.scale = Path(path), scale

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        if not trainer.is_global_zero or not predictions:
            return
        samples = torch.cat([p["samples"] for p in predictions])
        labels = torch.cat([p["labels"] for p in predictions])
        order = torch.argsort(labels, stable=True)
        rows = len(torch.unique(labels))
        grid = image_grid(samples[order], rows)
        pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        image = image.resize((image.width * self.scale, image.height * self.scale), Image.NEAREST)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            image.save(self.path)
        except OSError as err:
            raise OSError(f"PredictionGrid path: cannot write '{self.path}' ({err.strerror}); choose a writable "
                          "path with --trainer.callbacks.path or in the config.") from None
        pl_module.print(f"wrote {len(samples)} samples ({rows} labels, guidance {pl_module.guidance}) to {self.path}")
