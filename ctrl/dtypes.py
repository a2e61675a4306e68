"""Floating-point types by the names configs use (``dtype: bfloat16``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
