"""Datamodules shipped with ctrl (installed as ctrl.datamodules)."""

from ctrl.datamodules.digits import DigitsDataModule
from ctrl.datamodules.digits_data import digits_split
from ctrl.datamodules.images import ImageFolderDataModule
from ctrl.datamodules.labels import LabelsDataModule, PromptsDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "LabelsDataModule", "PromptsDataModule", "digits_split"]
