"""Label sets on digits, each with its TRUE labeller (what evaluation trusts; never the reward classifier).

=================  =======  ==================================================================  ==================
label set          classes  true label of an image                                              offline data
=================  =======  ==================================================================  ==================
class              10       the digit (real images: their label; samples: the SVC judge)        classifier split
compressibility    2        JPEG size (quality 75) of the image upsampled 4x: class 0 at most   even half of the
                            the pretrain split's lower tercile (compressible), class 1 above    classifier split,
                            its upper tercile; the middle third is neither (a margin)           margin left out
ink                2        pixel mass sum((x + 1) / 2) above the pretrain split's median       odd half of the
                            (class 1: heavy)                                                    classifier split
=================  =======  ==================================================================  ==================

The reward classifier of a label set is learned from its offline data (and temperature-scaled on
the same half of the calibration split): compressibility and ink use disjoint halves, so no image
needs both labels (the multi-task reward sums two classifiers, conditionally independent given x).

Why compressibility is measured that way: a 16x16 digit's JPEG at quality 95 is about 440 bytes of header
and tables, and the quartiles of its size lie 4-5 bytes apart, too close for any classifier to read
(an RBF SVM on the 175 labelled images: 0.41 held out). Upsampled 4x (bilinear) and saved at quality 75, the content
dominates (the classes are about 130 and 70 bytes wide, with a 28-byte margin between them), and the
classes can be learned from the offline half: the shipped classifier's held-out figure is in
benchmarks/RESULTS.md. An image in the margin has no class: it is left out of the offline data, and a
sample there is wrong whichever class was asked for (the true labeller gives it ``NUM_CLASSES``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ctrl.datamodules.digits_data import digits_judge, digits_split
from ctrl.images import jpeg_kilobytes

LABEL_SETS = ("class", "compressibility", "ink")
NUM_CLASSES = {"class": 10, "compressibility": 2, "ink": 2}
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


def compression_bytes(images: Tensor) -> Tensor:
    """The compressibility measure of ``[N, 1, S, S]`` images in [-1, 1], ``[N]`` bytes: the JPEG (quality 75)
    of each image upsampled 4x by bilinear interpolation (module docstring: why not the image's own JPEG)."""
    up = F.interpolate(images.detach().float().clamp(-1, 1), scale_factor=4, mode="bilinear", align_corners=False)
    return jpeg_kilobytes(up, quality=75).cpu() * 1000


@lru_cache(maxsize=4)
def boundaries(name: str, image_size: int = 16) -> Tensor:
    """The class boundaries of a binned label set, from the real pretrain split: the terciles of
    :func:`compression_bytes` for compressibility (classes below the first and above the second), the ink
    median for ink."""
    images, _ = digits_split("pretrain", image_size)
    if name == "compressibility":
        return torch.quantile(compression_bytes(images), torch.tensor([1 / 3, 2 / 3]))
    if name == "ink":
        return torch.quantile(ink(images), torch.tensor([0.5]))
    raise ValueError(f"label set '{name}' has no boundaries")


def true_labels(name: str, images: Tensor) -> Tensor:
    """The true labeller of label set ``name`` for images ``[N, 1, S, S]`` in [-1, 1] -> ``[N]`` (long); for
    compressibility ``NUM_CLASSES[name]`` marks an image in the margin (no class).

    For ``class`` it is the independent SVC judge (the digit of a generated image has no ground truth).
    """
    check_label_set(name)
    size = images.shape[-1]
    if name == "class":
        svc, _ = digits_judge(size)
        return torch.as_tensor(svc.predict(images.detach().clamp(-1, 1).flatten(1).cpu().numpy()), dtype=torch.long)
    if name == "compressibility":
        low, high = boundaries(name, size).tolist()
        sizes = compression_bytes(images)
        return torch.where(sizes <= low, 0, torch.where(sizes > high, 1, NUM_CLASSES[name]))
    return torch.bucketize(ink(images).cpu(), boundaries(name, size), right=True)


def offline_split(name: str, split: str, image_size: int = 16) -> tuple[Tensor, Tensor]:
    """Images and labels of label set ``name`` on its part of a digits split (module docstring): the real
    digit labels for ``class``, the true labeller's for the others (images without a class left out)."""
    images, digits = digits_split(split, image_size)
    part = OFFLINE_PART[name] if split in ("classifier", "calibration") else slice(None)
    images, digits = images[part], digits[part]
    if name == "class":
        return images, digits
    labels = true_labels(name, images)
    keep = labels < NUM_CLASSES[name]
    return images[keep], labels[keep]


def first_per_class(labels: Tensor, per_class: int, num_classes: int) -> Tensor:
    """Indices of the first ``per_class`` images of each class in ``labels`` ``[N]`` (the split's fixed order), so
    every model that learns from "n labelled images per class" learns from the same ones; a class with fewer
    is a ValueError naming how many it has."""
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < per_class:
        scarce = int(counts.argmin())
        raise ValueError(
            f"{per_class} labelled images per class, but class {scarce} has {int(counts[scarce])} here: "
            f"choose at most {int(counts.min())}, or leave it unset (all of them)."
        )
    first = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in range(num_classes)]
    return torch.cat(first).sort().values  # in the split's order


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
