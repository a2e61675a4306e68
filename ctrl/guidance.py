"""The old name of :mod:`ctrl.inference_time` (``class_path: ctrl.guidance.SMC`` still loads, with a notice)."""

from __future__ import annotations

import ctrl.inference_time
from ctrl.errors import notice


def __getattr__(name: str):
    if name in ctrl.inference_time.__all__:
        notice(
            f"ctrl.guidance is renamed ctrl.inference_time; write class_path: ctrl.inference_time.{name} "
            "(the old name works until ctrl 0.3)."
        )
        return getattr(ctrl.inference_time, name)
    raise AttributeError(f"module 'ctrl.guidance' has no attribute '{name}'")
