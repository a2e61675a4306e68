"""The one tuning rule every method of a comparison gets, and the spread of a figure over repeats.

A method's settings are tried on VALIDATION seeds only (:mod:`ctrl.seeds`), at most :data:`MAX_SETTINGS`
of them for every method (the same budget), and one is chosen by one rule for all: the highest accuracy
among the settings whose Frechet distance is at most ``max_frechet_ratio`` times the pretrained model's on
the same seeds; where none is, the most accurate; ties go to the setting listed first. A setting without
figures (its fit diverged: NaN) is never chosen unless every one is without. The chosen setting is then
reported on TEST seeds, never chosen on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

#: the most settings any one method may try on validation seeds (the same tuning budget for every method)
MAX_SETTINGS = 6


def choose(accuracy: Sequence[float], frechet: Sequence[float], base_frechet: float, max_frechet_ratio: float) -> int:
    """The index of the chosen setting (module docstring) from each setting's validation ``accuracy`` and
    ``frechet`` and the pretrained model's ``base_frechet`` on the same seeds."""
    if not accuracy or len(accuracy) != len(frechet):
        raise ValueError(f"give one accuracy and one Frechet distance per setting, got {accuracy} and {frechet}")
    scored = [i for i in range(len(accuracy)) if math.isfinite(accuracy[i]) and math.isfinite(frechet[i])]
    if not scored:
        return 0
    allowed = [i for i in scored if frechet[i] <= max_frechet_ratio * base_frechet]
    return max(allowed or scored, key=lambda i: accuracy[i])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a figure over repeats."""
    values = [float(v) for v in values]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
