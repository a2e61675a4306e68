"""Learn p(y|x) from an offline labelled dataset, calibrated by temperature scaling.

The classifier is the reward of conditional control (log p(y|x0)); RL will push images toward
whatever raises it, so training can be made robust (``robust=True``): each batch also holds
randomly shifted, noised and FGSM-perturbed copies (docs/digits-study.md: a plainly trained classifier
is fooled by the policy).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from ctrl.assets import notice_if_shadowed
from ctrl.errors import SettingError, trained_at_least_one_step


class ConvClassifier(nn.Module):
    """A small CNN for ``[B, C, H, W]`` images in [-1, 1]; returns logits ``[B, num_labels]``."""

    def __init__(self, num_labels: int = 10, channels: int = 1, width: int = 32):
        super().__init__()
        self.config = dict(num_labels=num_labels, channels=channels, width=width)
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, num_labels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def save_classifier(net: ConvClassifier, temperature: float, path: str | Path) -> None:
    """Weights and config in one safetensors file (config and temperature in its metadata)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(net.config), "temperature": repr(float(temperature))}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path: str | Path) -> tuple[ConvClassifier, float]:
    """Inverse of :func:`save_classifier`; one clear message for a missing (FileNotFoundError) or damaged
    (ValueError) file, which the class whose setting gave ``path`` names (``ctrl.errors.setting``)."""

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no classifier file at '{path}'. Train one with "
            "`ctrl fit --config configs/digits/classifier.yaml` or give the right path."
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        net = ConvClassifier(**json.loads(meta["config"]))
        net.load_state_dict(state)
        temperature = float(meta["temperature"])
    except (SafetensorError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(
            f"'{path}' is not a readable ctrl classifier ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Retrain it with "
            "configs/digits/classifier.yaml."
        ) from None
    return net, temperature


class ClassifierTraining(L.LightningModule):
    """Trains :class:`ConvClassifier`, then fits a temperature on the validation split and exports.

    Args:
        num_labels, channels, width: the network.
        lr, weight_decay: AdamW.
        robust: add shifted, noised and FGSM copies of each batch.
        max_noise_std, max_fgsm_eps: upper ends of the uniform draws of noise std and FGSM epsilon.
        export_path: where the calibrated classifier is written (safetensors) when fit ends.
    """

    def __init__(
        self,
        num_labels: int = 10,
        channels: int = 1,
        width: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        robust: bool = True,
        max_noise_std: float = 0.3,
        max_fgsm_eps: float = 0.3,
        export_path: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = ConvClassifier(num_labels, channels, width)
        self.temperature = 1.0
        self.val_acc = MulticlassAccuracy(num_labels, average="micro")
        self.val_ece = MulticlassCalibrationError(num_labels, n_bins=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) / self.temperature

    def setup(self, stage: str) -> None:
        n = getattr(self.trainer.datamodule, "num_labels", None) if self.trainer.datamodule is not None else None
        if isinstance(n, (list, tuple)):
            raise ValueError(
                "data.label_set: a classifier learns one label set; give one name (a list is the "
                "data of a conditional model, ctrl.pretrain.DiffusionPretraining)."
            )
        if n is not None and n != self.hparams.num_labels:
            raise ValueError(
                f"model.num_labels={self.hparams.num_labels} but the data's label set has {n} labels; make them equal."
            )

    def _robust_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        shifts = torch.randint(-1, 2, (2,)).tolist()
        shifted = torch.roll(x, shifts=shifts, dims=(2, 3))
        noisy = x + torch.rand(b, 1, 1, 1, device=x.device) * self.hparams.max_noise_std * torch.randn_like(x)
        x_adv = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(self.net(x_adv), y), x_adv)
        eps = torch.rand(b, 1, 1, 1, device=x.device) * self.hparams.max_fgsm_eps
        adversarial = (x + eps * grad.sign()).clamp(-1, 1)
        return torch.cat([x, shifted, noisy.clamp(-1, 1), adversarial]), y.repeat(4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.robust:
            x, y = self._robust_batch(x, y)
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        probs = self(x).softmax(-1)
        self.val_acc.update(probs, y)
        self.val_ece.update(probs, y)

    def on_validation_epoch_end(self):
        self.log_dict({"val/accuracy": self.val_acc.compute(), "val/calibration_error": self.val_ece.compute()})
        self.val_acc.reset()
        self.val_ece.reset()

    test_step = validation_step

    def on_test_epoch_end(self):
        self.log_dict({"test/accuracy": self.val_acc.compute(), "test/calibration_error": self.val_ece.compute()})
        self.val_acc.reset()
        self.val_ece.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def calibrate(self, loader) -> float:
        """Temperature scaling (Guo et al. 2017): the T minimising the NLL of ``loader``'s labels."""
        logits, labels = [], []
        for x, y in loader:
            logits.append(self.net(x.to(self.device)))
            labels.append(y.to(self.device))
        logits, labels = torch.cat(logits), torch.cat(labels)
        log_t = torch.zeros(1, requires_grad=True, device=self.device)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(logits / log_t.exp(), labels)
                loss.backward()
            return loss

        opt.step(closure)
        self.temperature = float(log_t.exp())
        return self.temperature

    @torch.no_grad()
    def report(self, loader) -> dict[str, float]:
        """Accuracy and expected calibration error on ``loader`` (temperature applied)."""
        acc = MulticlassAccuracy(self.hparams.num_labels, average="micro")
        ece = MulticlassCalibrationError(self.hparams.num_labels, n_bins=10)
        for x, y in loader:
            probs = self(x.to(self.device)).softmax(-1).cpu()
            acc.update(probs, y)
            ece.update(probs, y)
        return {"accuracy": float(acc.compute()), "calibration_error": float(ece.compute())}

    def on_fit_start(self):
        dm = self.trainer.datamodule
        if dm is not None and len(dm.val_dataloader().dataset) == 0:
            key = next((k for k in ("val_fraction", "val_split") if k in dm.hparams), "")
            raise SettingError(
                dm,
                key,
                "holds out no image, and the classifier calibrates its temperature on held-out images after "
                "training: hold some out (a larger val_fraction, another val_split, or more images).",
            )

    def on_fit_end(self):
        dm = self.trainer.datamodule
        if self.hparams.export_path:
            trained_at_least_one_step(self.trainer, self.hparams.export_path)
        before = self.report(dm.test_dataloader())
        t = self.calibrate(dm.val_dataloader())
        after = self.report(dm.test_dataloader())
        held_out, test = (f"'{dm.hparams.get(k, 'held-out')}'" for k in ("val_split", "test_split"))
        self.print(
            f"temperature scaling on {held_out}: T = {t:.3f}\n"
            f"{test} split: accuracy {after['accuracy']:.4f}, calibration error "
            f"{before['calibration_error']:.4f} -> {after['calibration_error']:.4f}"
        )
        if self.hparams.export_path and self.trainer.is_global_zero:
            save_classifier(self.net, t, self.hparams.export_path)
            self.print(f"classifier written to {self.hparams.export_path}")
            notice_if_shadowed(self.hparams.export_path)
