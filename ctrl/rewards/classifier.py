"""log p(y | x0) of a learned, temperature-calibrated classifier: the first paper's reward."""

from __future__ import annotations

from torch import Tensor

from ctrl.assets import resolve_path
from ctrl.classifier import load_classifier
from ctrl.errors import SettingError, setting
from ctrl.rewards.base import Reward


class ClassifierLogProb(Reward):
    """``log softmax(f(x0) / T)[y]``, with f and T as written by ClassifierTraining.

    Args:
        path: the safetensors file (``ctrl:digits-classifier.safetensors`` is shipped).
        temperature: overrides the calibrated temperature when given.
    """

    differentiable = True

    def __init__(self, path: str = "ctrl:digits-classifier.safetensors", temperature: float | None = None):
        super().__init__()
        with setting(self, "path", path):
            self.net, calibrated = load_classifier(resolve_path(path))
        self.net.requires_grad_(False)
        self.net.eval()
        self.temperature = calibrated if temperature is None else temperature
        if self.temperature <= 0:
            raise SettingError(self, "temperature", f"must be > 0, got {self.temperature}.", value=temperature)
        self.num_labels = self.net.config["num_labels"]

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen judge: never in training mode

    def logits(self, x0: Tensor) -> Tensor:
        return self.net(x0) / self.temperature

    def forward(self, x0: Tensor, labels: Tensor) -> Tensor:
        return self.logits(x0).log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
