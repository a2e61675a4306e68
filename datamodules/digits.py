"""Labelled digit images (:mod:`ctrl.datamodules.digits_data`'s splits) for training a base model or a classifier."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ctrl.datamodules.digits_data import SPLITS
from ctrl.datamodules.labelsets import (
    NUM_CLASSES,
    check_label_set,
    check_label_sets,
    first_per_class,
    offline_conditions,
    offline_split,
)
from ctrl.datamodules.loaders import training_loader
from ctrl.errors import SettingError, setting


class DigitsDataModule(L.LightningDataModule):
    """Labelled digit images for training a base model or a classifier.

    Args:
        train_split: the split to train on ("pretrain" for the base model, "classifier" for p(y|x)).
        val_split: the split to validate on (the classifier validates and calibrates on "calibration").
        test_split: the split to test on.
        batch_size: images per batch.
        image_size: 16 (default) or the native 8.
        label_set: which labels the images carry (``ctrl.datamodules.labelsets``): "class" (the digit),
            "compressibility" or "ink"; the latter two use their own half of the classifier and
            calibration splits. A list of label sets (a conditional model's offline data, e.g.
            ``[compressibility, ink]``) gives labels ``[B, S]`` with each set's null label where an image
            lacks it (:func:`ctrl.datamodules.labelsets.offline_conditions`); ``num_labels`` is then a list.
        labelled_per_class: train on the first n images of each class of the training split only (of each
            label set's classes, for several; None: all): the labelled-data budget of a reward classifier and
            of a conditional model, the same images for both.
    """

    def __init__(
        self,
        train_split: str = "pretrain",
        val_split: str = "heldout",
        test_split: str = "heldout",
        batch_size: int = 64,
        image_size: int = 16,
        num_workers: int = 0,
        label_set: str | list[str] = "class",
        labelled_per_class: int | None = None,
    ):
        super().__init__()
        for name, split in (("train_split", train_split), ("val_split", val_split), ("test_split", test_split)):
            if split not in SPLITS:
                raise SettingError(
                    self, name, f"'{split}' is not a digits split; choose one of {sorted(SPLITS)}.", value=split
                )
        self.save_hyperparameters()
        with setting(self, "label_set", label_set):
            if isinstance(label_set, str):
                self.num_labels = NUM_CLASSES[check_label_set(label_set)]
            else:
                self.num_labels = [NUM_CLASSES[name] for name in check_label_sets(list(label_set))]
        if labelled_per_class is not None:
            with setting(self, "labelled_per_class", labelled_per_class):
                if labelled_per_class < 1:
                    raise ValueError(f"give at least 1 image per class, got {labelled_per_class}.")
                self._data(train_split, labelled_per_class)  # refused here when a class has fewer

    def _data(self, split: str, per_class: int | None = None) -> tuple[Tensor, Tensor]:
        """The split's images and labels; with ``per_class``, the first that many of each class (of each set)."""
        label_set, size = self.hparams.label_set, self.hparams.image_size
        if isinstance(label_set, str):
            images, labels = offline_split(label_set, split, size)
            keep = None if per_class is None else first_per_class(labels, per_class, NUM_CLASSES[label_set])
            return (images, labels) if keep is None else (images[keep], labels[keep])
        images, labels = offline_conditions(list(label_set), split, size)
        if per_class is None:
            return images, labels
        keep = []
        for s, name in enumerate(label_set):  # each image carries one set's label: cut each set's own images
            rows = torch.nonzero(labels[:, s] < NUM_CLASSES[name]).squeeze(1)
            keep.append(rows[first_per_class(labels[rows, s], per_class, NUM_CLASSES[name])])
        keep = torch.cat(keep)
        return images[keep], labels[keep]

    def labelled_images_per_class(self) -> float:
        """Training images per class after the ``labelled_per_class`` cut (the mean over classes; of every label
        set's classes for several): the labelled-data budget this module trains on."""
        images, _ = self._data(self.hparams.train_split, self.hparams.labelled_per_class)
        return len(images) / sum([self.num_labels] if isinstance(self.num_labels, int) else self.num_labels)

    def _loader(self, split: str) -> DataLoader:
        per_class = self.hparams.labelled_per_class if split == self.hparams.train_split else None
        images, labels = self._data(split, per_class)
        return DataLoader(
            TensorDataset(images, labels), batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        images, labels = self._data(h.train_split, h.labelled_per_class)
        return training_loader(TensorDataset(images, labels), h.batch_size, self.trainer, h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split)
