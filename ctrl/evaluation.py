"""Evaluation of generated samples by judges that are NOT the reward.

A reward that rises while an independent judge stays flat is reward hacking (docs/digits-study.md), so
label accuracy is measured by another model family trained on another split, and sample quality
by a Frechet distance to held-out real images in that judge's feature space.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ctrl.conditions import join_condition, split_condition
from ctrl.datamodules.digits_data import digits_judge, digits_split
from ctrl.datamodules.labelsets import NUM_CLASSES, check_label_set, true_labels
from ctrl.errors import SettingError, setting
from ctrl.images import jpeg_kilobytes
from ctrl.linear_gaussian import chain_moments, chain_optimum


class Evaluator(ABC):
    """Scores samples ``[N, C, H, W]`` generated for labels ``[N]``; returns named scalar tensors."""

    num_labels: int

    def attach(self, module) -> None:  # noqa: B027  (a hook: most evaluators need nothing)
        """Called once by the ControlModule that evaluates with it (an evaluator may read its settings)."""

    @abstractmethod
    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]: ...

    def check_conditions(self, module, key: str, fix: str) -> None:
        """Refuse a module whose policy's reward labels are not this evaluator's ``num_labels`` conditions;
        ``key``: the evaluator's setting that fixes them, ``fix``: how to make them agree."""
        if module.policy.num_reward_labels != self.num_labels:
            given = f"makes {self.num_labels} conditions but the policy has {module.policy.num_reward_labels}"
            raise SettingError(self, key, f"{given}; {fix}")


def classification_scores(judged: Tensor, labels: Tensor, num_labels: int) -> dict[str, Tensor]:
    """Judged against requested labels (``[N]`` each): ``accuracy``, ``macro_f1``, ``min_class_accuracy``
    (over the labels requested at least once) and ``confusion`` (rows requested, columns judged).

    A judged ``num_labels`` means no class (a sample in a label set's margin): wrong for every request, and
    counted in a last column of ``confusion``; ``macro_f1`` averages the real classes only.
    """
    columns = num_labels + 1  # the last: no class
    confusion = MulticlassConfusionMatrix(columns)(judged, labels)[:num_labels]
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    f1 = MulticlassF1Score(columns, average="none")(judged, labels)[:num_labels]
    seen = (confusion.sum(1) + confusion.sum(0)[:num_labels]) > 0  # as torchmetrics' macro: classes in play
    if not bool((judged == num_labels).any()):
        confusion = confusion[:, :num_labels]
    return {
        "accuracy": MulticlassAccuracy(columns, average="micro")(judged, labels),
        "macro_f1": f1[seen].mean(),
        "min_class_accuracy": per_class[confusion.sum(1) > 0].min(),
        "confusion": confusion,
    }


class LinearFeatures(nn.Module):
    """A fixed linear map of flattened pixels to ``num_features`` features (PCA), ``[N, C, H, W] -> [N, F]``.

    The custom feature extractor of torchmetrics' Frechet distance.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("components", torch.tensor(components, dtype=torch.float32))
        self.num_features = components.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1).float() - self.mean) @ self.components.T


class DigitsEvaluator(Evaluator):
    """The digits judge: an RBF support-vector classifier on pixels, trained on the pretraining split.

    It shares neither model family nor data with the reward classifier (trained on the classifier
    split). The Frechet distance compares samples with the held-out split in the space of the
    first ``num_features`` principal components of the pretraining split's pixels.

    Metrics: ``accuracy``, ``macro_f1``, ``min_class_accuracy``, the confusion matrix (``confusion``, rows =
    requested label, columns = judged label), ``frechet``, ``frechet_floor`` (real digits' distance at the same
    number of samples: at n = 500 about a third of the pretrained model's) and ``kid`` (unbiased).
    """

    def __init__(self, num_labels: int = 10, image_size: int = 16, num_features: int = 20):
        self.num_labels = num_labels
        self.svc, pca = digits_judge(image_size, num_features)
        self.features = LinearFeatures(pca.mean_, pca.components_)
        self.real, _ = digits_split("heldout", image_size)
        self.pretrain, _ = digits_split("pretrain", image_size)
        self._floors: dict[int, Tensor] = {}

    def judge(self, samples: Tensor) -> Tensor:
        """The judge's label for each sample, ``[N]``."""
        pixels = samples.detach().clamp(-1, 1).flatten(1).cpu().numpy()
        return torch.as_tensor(self.svc.predict(pixels), dtype=torch.long)

    def frechet(self, samples: Tensor) -> Tensor:
        """The Frechet distance of ``samples`` ``[N, 1, S, S]`` to the held-out digits in the PCA features."""
        # no sync across processes: under DDP every rank already holds all the gathered samples
        fid = FrechetInceptionDistance(feature=self.features, normalize=False, sync_on_compute=False)
        fid.update(self.real, real=True)
        fid.update(samples.detach().cpu().clamp(-1, 1), real=False)
        return fid.compute().float()

    def frechet_floor(self, n: int) -> Tensor:
        """The Frechet distance of ``n`` REAL pretraining digits (the first n of that split; all 1,000 when n is
        larger) to the held-out ones: what a sample set of that size scores from finite n alone."""
        if n not in self._floors:
            self._floors[n] = self.frechet(self.pretrain[:n])
        return self._floors[n]

    def kid(self, samples: Tensor) -> Tensor:
        """torchmetrics' kernel distance (polynomial-kernel MMD^2, unbiased: about 0 for real digits at any n)
        of ``samples`` to the held-out digits in the same features: the mean over 100 subsets of
        min(N, held-out) samples each, drawn from a fixed seed so the figure is reproducible and the global
        random state is left as it was."""
        size = min(len(samples), len(self.real))
        if size < 2:  # an unbiased MMD needs two samples a side
            return torch.tensor(float("nan"))
        kid = KernelInceptionDistance(feature=self.features, subset_size=size, normalize=False, sync_on_compute=False)
        kid.update(self.real, real=True)
        kid.update(samples.detach().cpu().clamp(-1, 1), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return kid.compute()[0].float()

    def fidelity(self, samples: Tensor) -> dict[str, Tensor]:
        """``frechet``, its ``frechet_floor`` at the same n, and ``kid`` of ``samples``."""
        return {
            "frechet": self.frechet(samples),
            "frechet_floor": self.frechet_floor(len(samples)),
            "kid": self.kid(samples),
        }

    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {**classification_scores(self.judge(samples), labels.cpu(), self.num_labels), **self.fidelity(samples)}


class JpegSizeEvaluator(Evaluator):
    """The true labeller of conditional compressibility: an image's class is the bin of its JPEG size.

    The first paper's evaluation: the JPEG size (kB at quality 95) of each sample, binned by
    ``boundaries_kb`` (class k: between boundary k-1 and k; class 0 the most compressible), compared
    with the requested class. Metrics: ``accuracy``, ``macro_f1``, ``min_class_accuracy``,
    ``jpeg_kb`` (mean size) and the confusion matrix.

    Args:
        boundaries_kb: increasing sizes separating the classes (``num_labels - 1`` of them).
        quality: JPEG quality.
    """

    def __init__(self, boundaries_kb: list[float], quality: int = 95):
        if any(b >= c for b, c in zip(boundaries_kb, boundaries_kb[1:])) or not boundaries_kb:
            raise SettingError(self, "boundaries_kb", f"must be increasing and non-empty, got {boundaries_kb}.")
        self.boundaries = torch.tensor(boundaries_kb, dtype=torch.float32)
        self.num_labels, self.quality = len(boundaries_kb) + 1, quality

    def attach(self, module) -> None:
        self.check_conditions(module, "boundaries_kb", "give one boundary fewer than classes.")

    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        sizes = jpeg_kilobytes(samples, self.quality).cpu()
        judged = torch.bucketize(sizes, self.boundaries)
        return {**classification_scores(judged, labels.cpu(), self.num_labels), "jpeg_kb": sizes.mean()}


class LabelSetEvaluator(Evaluator):
    """Digits samples judged by the TRUE labeller of a label set (``ctrl.datamodules.labelsets``), or of
    several at once (multi-task: conditions numbered as ``ctrl.conditions.split_condition`` does),
    plus the fidelity figures of :class:`DigitsEvaluator` (``frechet``, ``frechet_floor``, ``kid``).

    Metrics: ``accuracy``, ``macro_f1``, ``min_class_accuracy`` and ``confusion`` over the conditions
    (for several label sets: a sample counts as right when every label is), the fidelity figures; with several
    label sets also ``<set>_accuracy`` and ``<set>_macro_f1`` for each.

    Args:
        label_sets: one label set name or a list of them ("class", "compressibility", "ink").
        image_size, num_features: as DigitsEvaluator.
    """

    def __init__(self, label_sets: str | list[str] = "compressibility", image_size: int = 16, num_features: int = 20):
        self.label_sets = [label_sets] if isinstance(label_sets, str) else list(label_sets)
        with setting(self, "label_sets", label_sets):
            for name in self.label_sets:
                check_label_set(name)
        self.sizes = [NUM_CLASSES[n] for n in self.label_sets]
        self.num_labels = math.prod(self.sizes)
        self.fidelity = DigitsEvaluator(self.num_labels, image_size, num_features).fidelity

    def attach(self, module) -> None:
        self.check_conditions(module, "label_sets", f"{self.label_sets} and the policy's labels must agree.")

    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        labels = labels.cpu()
        judged = [true_labels(name, samples) for name in self.label_sets]
        wanted = split_condition(labels, self.sizes)
        joint = join_condition([j.clamp(max=n - 1) for j, n in zip(judged, self.sizes)], self.sizes)
        classless = torch.stack([j >= n for j, n in zip(judged, self.sizes)]).any(0)  # in some set's margin
        metrics = classification_scores(joint.masked_fill(classless, self.num_labels), labels, self.num_labels)
        if len(self.label_sets) > 1:
            for name, j, y, n in zip(self.label_sets, judged, wanted, self.sizes):
                part = classification_scores(j, y, n)
                metrics.update({f"{name}_accuracy": part["accuracy"], f"{name}_macro_f1": part["macro_f1"]})
        return {**metrics, **self.fidelity(samples)}


def tilted_gaussian(
    mean: Tensor, std: float | Tensor, A: Tensor, y: Tensor, sigma: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """Mean ``[d]`` and covariance ``[d, d]`` of p(x) ∝ N(x; m, s^2 I) exp(-||A x - y||^2 / (2 sigma^2 alpha)).

    Precision ``P = I / s^2 + A^T A / (sigma^2 alpha)``, mean ``P^-1 (m / s^2 + A^T y / (sigma^2 alpha))``.
    """
    A, y, mean = A.double(), y.double(), mean.double()
    d = mean.numel()
    precision = torch.eye(d, dtype=torch.float64) / std**2 + A.T @ A / (sigma**2 * alpha)
    cov = torch.linalg.inv(precision)
    return cov @ (mean / std**2 + A.T @ y / (sigma**2 * alpha)), cov


def gaussian_kl_full(mean: Tensor, cov: Tensor, mean_ref: Tensor, std_ref: float) -> Tensor:
    """KL(N(mean, cov) || N(mean_ref, std_ref^2 I)) in closed form."""
    d = mean.numel()
    diff = mean - mean_ref.double()
    return 0.5 * (
        torch.trace(cov) / std_ref**2 + diff.dot(diff) / std_ref**2 - d + d * math.log(std_ref**2) - torch.logdet(cov)
    )


def relative_errors(mean: Tensor, cov: Tensor, mean_ref: Tensor, cov_ref: Tensor) -> tuple[Tensor, Tensor]:
    """``||mean - mean_ref|| / ||mean_ref||`` (over sqrt(tr cov_ref) when mean_ref = 0) and
    ``||cov - cov_ref||_F / ||cov_ref||_F``."""
    scale = mean_ref.norm() if mean_ref.norm() > 1e-8 else torch.trace(cov_ref).sqrt()
    return ((mean - mean_ref).norm() / scale).float(), ((cov - cov_ref).norm() / cov_ref.norm()).float()


class TiltedGaussianEvaluator(Evaluator):
    """Checks samples against the closed-form targets of the Gaussian world.

    Two targets, both read from the module (policy m, s; reward A, y, sigma; the algorithm's KL
    weight alpha; the evaluation grid), so any of them can be changed on the command line:

    - ``target_*``: the continuous-time target p_pre(x) exp(r(x) / alpha) / Z, with p_pre the
      N(m', v I) that the pretrained chain really samples on the evaluation grid
      (``AnalyticGaussian.pretrained_marginal``).
    - ``optimum_*``: the optimum of E[r] - alpha KL over the discrete chain's own family (mean
      controls at the pretrained step variances, :func:`ctrl.linear_gaussian.chain_optimum`), which a
      plugin can reach exactly on the grid it trained on; the gap to the first is the family's.

    Metrics: ``<target>_mean_rel_err`` = ||mean_hat - mean*|| / ||mean*|| (over sqrt(tr cov*) when
    mean* = 0) and ``<target>_cov_rel_err`` = ||cov_hat - cov*||_F / ||cov*||_F from the samples;
    ``policy_optimum_{mean,cov}_rel_err``, the same against the optimum from the policy's own chain
    moments, exactly (its control is affine, so no sampling noise: what is left is the estimator's
    error); ``target_kl``, the closed-form KL of the continuous target to p_pre (beside the module's
    estimated ``kl``, an upper bound: the chain KL is at least the KL of its final marginal).
    """

    num_labels = 1

    def __init__(self):
        self.target: tuple[Tensor, Tensor] | None = None

    def attach(self, module) -> None:
        policy, reward, alpha = module.policy, module.reward, module.algorithm.alpha
        if not alpha or alpha <= 0:
            raise SettingError(
                self,
                "",
                "needs the algorithm's KL weight alpha > 0 (the target p_pre exp(r / alpha) is undefined at "
                "alpha = 0); set the module's algorithm.alpha.",
            )
        if not hasattr(policy, "affine_steps") or not all(hasattr(reward, a) for a in ("A", "y", "sigma")):
            raise SettingError(
                self, "", "needs the module's policy AnalyticGaussian and its reward GaussianLogLikelihood."
            )
        steps = policy.affine_steps(module.eval_num_steps, module.eta, control_scale=0.0)  # the pretrained chain
        mean, cov = chain_moments(steps)  # isotropic: every pretrained step is f x + g in each coordinate
        self.pretrained = (mean, math.sqrt(float(cov[0, 0])))
        self.target = tilted_gaussian(*self.pretrained, reward.A.cpu(), reward.y.cpu(), reward.sigma, alpha)
        self.optimum = chain_optimum(steps, reward.A.cpu(), reward.y.cpu(), reward.sigma, alpha)[1:]
        self.policy_moments = lambda: chain_moments(
            policy.affine_steps(module.eval_num_steps, module.eta, control_scale=module.control_scale)
        )

    def evaluate(self, samples: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if self.target is None:
            raise RuntimeError("TiltedGaussianEvaluator.attach was not called")
        x = samples.detach().cpu().double()
        mean_hat, cov_hat = x.mean(0), torch.cov(x.T).reshape(self.target[1].shape)
        out = {}
        for name, ref, (mean, cov) in (
            ("target", self.target, (mean_hat, cov_hat)),
            ("optimum", self.optimum, (mean_hat, cov_hat)),
            ("policy_optimum", self.optimum, self.policy_moments()),
        ):
            out[f"{name}_mean_rel_err"], out[f"{name}_cov_rel_err"] = relative_errors(mean, cov, *ref)
        out["target_kl"] = gaussian_kl_full(*self.target, *self.pretrained).float()
        return out
