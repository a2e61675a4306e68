"""Labelled digit images (:mod:`ctrl.datamodules.digits_data`'s splits) for training a base model or a classifier."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from ctrl.datamodules.digits_data import SPLITS
from ctrl.datamodules.labelsets import (
    NUM_CLASSES,
    check_label_set,
    check_label_sets,
    offline_conditions,
    offline_split,
)
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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        label_set = self.hparams.label_set
        images, labels = (
            offline_split(label_set, split, self.hparams.image_size)
            if isinstance(label_set, str)
            else offline_conditions(list(label_set), split, self.hparams.image_size)
        )
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split, shuffle=False)
