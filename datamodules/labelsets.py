"""Label sets on digits, each with its TRUE labeller (what evaluation trusts; never the reward classifier).

=================  =======  ==================================================================  ==================
label set          classes  true label of an image                                              offline data
=================  =======  ==================================================================  ==================
class              10       the digit (real images: their label; samples: the SVC judge)        classifier split
compressibility    4        JPEG size at quality 95, binned at the quartiles of the pretrain    even half of the
                            split's sizes (class 0: the most compressible quarter)              classifier split
ink                2        pixel mass sum((x + 1) / 2) above the pretrain split's median       odd half of the
                            (class 1: heavy)                                                    classifier split
=================  =======  ==================================================================  ==================

The reward classifier of a label set is learned from its offline data (and temperature-scaled on
the same half of the calibration split): compressibility and ink use disjoint halves, so no image
needs both labels (the multi-task reward sums two classifiers, conditionally independent given x).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ctrl.datamodules.digits_data import digits_judge, digits_split
from ctrl.images import jpeg_kilobytes

LABEL_SETS = ("class", "compressibility", "ink")
NUM_CLASSES = {"class": 10, "compressibility": 4, "ink": 2}
#: which part of the classifier and calibration splits each label set's offline data is
OFFLINE_PART = {"class": slice(None), "compressibility": slice(0, None, 2), "ink": slice(1, None, 2)}


def check_label_set(name: str) -> str:
    """``name``, refused (ValueError) unless it is a label set; the class whose setting gave it names it."""
    if name not in LABEL_SETS:
        raise ValueError(f"'{name}' is not a label set; choose one of {list(LABEL_SETS)}.")
    return name


def check_label_sets(names: list[str]) -> list[str]:
    """Several label sets at once (a conditional model's offline data): each known, none twice."""
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give distinct label sets, got {names}.")
    return [check_label_set(name) for name in names]


def ink(images: Tensor) -> Tensor:
    """Pixel mass ``sum((x + 1) / 2)`` of ``[N, C, H, W]`` images in [-1, 1], ``[N]``."""
    return ((images.detach().float().clamp(-1, 1) + 1) / 2).flatten(1).sum(1)


@lru_cache(maxsize=4)
def boundaries(name: str, image_size: int = 16) -> Tensor:
    """The class boundaries of a binned label set, from the real pretrain split: JPEG-size quartiles
    (bytes) for compressibility, the ink median for ink."""
    images, _ = digits_split("pretrain", image_size)
    if name == "compressibility":
        return torch.quantile(jpeg_kilobytes(images) * 1000, torch.tensor([0.25, 0.5, 0.75]))
    if name == "ink":
        return torch.quantile(ink(images), torch.tensor([0.5]))
    raise ValueError(f"label set '{name}' has no boundaries")


def true_labels(name: str, images: Tensor) -> Tensor:
    """The true labeller of label set ``name`` for images ``[N, 1, S, S]`` in [-1, 1] -> ``[N]`` (long).

    For ``class`` it is the independent SVC judge (the digit of a generated image has no ground truth).
    """
    check_label_set(name)
    size = images.shape[-1]
    if name == "class":
        svc, _ = digits_judge(size)
        return torch.as_tensor(svc.predict(images.detach().clamp(-1, 1).flatten(1).cpu().numpy()), dtype=torch.long)
    if name == "compressibility":
        return torch.bucketize(jpeg_kilobytes(images).cpu() * 1000, boundaries(name, size), right=True)
    return torch.bucketize(ink(images).cpu(), boundaries(name, size), right=True)


def offline_split(name: str, split: str, image_size: int = 16) -> tuple[Tensor, Tensor]:
    """Images and labels of label set ``name`` on its part of a digits split (module docstring): the real
    digit labels for ``class``, the true labeller's for the others."""
    images, digits = digits_split(split, image_size)
    part = OFFLINE_PART[name] if split in ("classifier", "calibration") else slice(None)
    images, digits = images[part], digits[part]
    return images, digits if name == "class" else true_labels(name, images)


def offline_conditions(names: list[str], split: str, image_size: int = 16) -> tuple[Tensor, Tensor]:
    """The offline data of several label sets at once, for a conditional model that learns each from its
    own data: every label set's part of ``split`` (:func:`offline_split`), concatenated, with labels
    ``[N, S]`` (one column per set) holding the set's label and ``NUM_CLASSES[other]`` (that set's null
    label: unknown) in the other columns. No image needs more than one label."""
    images, labels = [], []
    for s, name in enumerate(check_label_sets(names)):
        x, y = offline_split(name, split, image_size)
        rows = torch.tensor([NUM_CLASSES[n] for n in names]).repeat(len(x), 1)
        rows[:, s] = y
        images.append(x)
        labels.append(rows)
    return torch.cat(images), torch.cat(labels)
