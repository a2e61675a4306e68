"""How conditions are numbered when a condition is a tuple of labels ``(y_1, ..., y_S)`` from S label sets
of sizes ``n_1, ..., n_S`` (multi-task control): one index by mixed radix, the last set varying fastest."""

from __future__ import annotations

import torch
from torch import Tensor


def split_condition(labels: Tensor, sizes: list[int]) -> list[Tensor]:
    """Condition indices ``[B]`` -> one label tensor ``[B]`` per label set:
    ``c = ((l_0 * n_1 + l_1) * n_2 + l_2) ...``."""
    out, rest = [], labels
    for n in reversed(sizes):
        out.append(rest % n)
        rest = rest // n
    return out[::-1]


def join_condition(parts: list[Tensor], sizes: list[int]) -> Tensor:
    """The inverse of :func:`split_condition`: one label tensor ``[B]`` per set -> condition indices ``[B]``."""
    condition = torch.zeros_like(parts[0])
    for part, n in zip(parts, sizes):
        condition = condition * n + part
    return condition


def condition_codes(labels: Tensor, sizes: list[int]) -> Tensor:
    """Labels ``[B, S]`` (set s in ``0..sizes[s]``, ``sizes[s]`` being its null label) -> a conditional
    model's class index ``[B]``, numbered over ``sizes[s] + 1`` per set; all null labels give
    ``prod(sizes[s] + 1) - 1``, the unconditional input."""
    return join_condition(list(labels.long().unbind(1)), [n + 1 for n in sizes])
