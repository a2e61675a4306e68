"""A user's own labelled images from a folder, for training a base model or a reward classifier."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, TensorDataset

from ctrl.datamodules.loaders import training_loader
from ctrl.errors import SettingError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHANNELS = {"L": 1, "RGB": 3}


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageFolderDataModule(L.LightningDataModule):
    """Images in one folder, with labels from a CSV, checked when the datamodule is built (before any
    training): every file must be an image of ``image_size`` x ``image_size`` with ``channels`` channels,
    and every image needs one known label.

    Batches are ``(images [B, C, H, W] in [-1, 1], labels [B])``, as DigitsDataModule's, so the pretraining
    and classifier modules take either.

    Args:
        root: the folder of images (every file in it must be an image; subfolders are ignored).
        labels_csv: a CSV with a header ``file,label`` (file names relative to ``root``, labels integers
            in 0..num_labels-1); None: unlabelled images (label 0), for a base model.
        num_labels: size of the label set.
        image_size: the images' height and width, in pixels.
        channels: 1 (grayscale, PIL mode L) or 3 (PIL mode RGB).
        val_fraction: share of the images held out for validation (a fixed split by ``seed``).
        batch_size: images per batch.
        seed: seeds the split.
    """

    def __init__(
        self,
        root: str,
        labels_csv: str | None = None,
        num_labels: int = 10,
        image_size: int = 16,
        channels: int = 1,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise SettingError(self, "channels", f"must be 1 (grayscale) or 3 (RGB), got {channels}.")
        if not 0 <= val_fraction < 1:
            raise SettingError(self, "val_fraction", f"must lie in [0, 1), got {val_fraction}.")
        folder = Path(root)
        if not folder.is_dir():
            raise SettingError(self, "root", f"no folder at '{root}'; give the folder that holds the images.")
        self.files = sorted(p for p in folder.iterdir() if p.is_file())
        if not self.files:
            raise SettingError(self, "root", f"'{root}' holds no files; put the images in it.")
        self._check_images(image_size, channels)
        self.labels = self._read_labels(labels_csv, num_labels) if labels_csv else [0] * len(self.files)
        self.num_labels = num_labels
        self.save_hyperparameters()

    def _check_images(self, size: int, channels: int) -> None:
        not_images = []
        for path in self.files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                not_images.append(path.name)
                continue
            try:
                with Image.open(path) as image:  # reads the header only
                    width, height, mode, bands = *image.size, image.mode, len(image.getbands())
            except (UnidentifiedImageError, OSError):
                not_images.append(path.name)
                continue
            if (width, height) != (size, size):
                raise SettingError(
                    self,
                    "image_size",
                    f"is {size} but {path.name} is {width}x{height}; resize the images to {size}x{size} or set "
                    "image_size to their size.",
                )
            if CHANNELS.get(mode) != channels:
                raise SettingError(
                    self,
                    "channels",
                    f"is {channels} but {path.name} has {bands} channels (PIL mode {mode}); convert the images to "
                    f"{'grayscale (L)' if channels == 1 else 'RGB'} or set channels to match them.",
                )
        if not_images:
            raise SettingError(
                self,
                "root",
                f"{len(not_images)} files are not images ({_listing(not_images)}); keep only images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder.",
            )

    def _read_labels(self, labels_csv: str, num_labels: int) -> list[int]:
        path = Path(labels_csv)
        if not path.is_file():
            raise SettingError(self, "labels_csv", f"no file at '{labels_csv}'.")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise SettingError(
                self, "labels_csv", f"'{labels_csv}' needs a header line `file,label` and one row per image."
            )
        given = {row["file"]: row["label"] for row in rows}
        names = [p.name for p in self.files]
        missing = [n for n in names if n not in given]
        if missing:
            raise SettingError(
                self,
                "labels_csv",
                f"{len(missing)} images have no label ({_listing(missing)}); add a row `file,label` for each.",
            )
        strangers = sorted(set(given) - set(names))
        if strangers:
            raise SettingError(
                self,
                "labels_csv",
                f"names {len(strangers)} files that are not in root ({_listing(strangers)}); remove those rows "
                "or add the images.",
            )
        labels = []
        for name in names:
            value = given[name].strip()
            if not value.lstrip("-").isdigit() or not 0 <= int(value) < num_labels:
                raise SettingError(
                    self,
                    "labels_csv",
                    f"the label '{value}' of {name} is not one of 0..{num_labels - 1} (num_labels); fix the row "
                    "or set num_labels.",
                )
            labels.append(int(value))
        return labels

    def setup(self, stage: str) -> None:
        if hasattr(self, "train_set"):
            return
        pixels = []
        for path in self.files:
            with Image.open(path) as image:
                pixels.append(np.asarray(image, dtype=np.float32).reshape(image.height, image.width, -1))
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1
        labels = torch.tensor(self.labels)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = round(self.hparams.val_fraction * len(images))
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.train_set, self.hparams.batch_size, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The held-out images again: a folder has one held-out set, which validates, calibrates a classifier's
        temperature and reports its accuracy."""
        return self.val_dataloader()
