"""The interface the sampler and the algorithms see."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from ctrl.rewards.base import call_reward


class DiffusionPolicy(nn.Module, ABC):
    """A pretrained network (noise or velocity predictor) and a trainable controlled one (:meth:`predict`).

    Subclasses set ``scheduler`` (a diffusers DDPM/DDIM or flow-matching Euler scheduler),
    ``sample_shape`` (``(C, H, W)``) and ``num_labels``; label index ``num_labels`` is the null label,
    which samples the pretrained model exactly.
    """

    scheduler: object
    sample_shape: tuple[int, ...]
    num_labels: int

    @property
    def null_label(self) -> int:
        return self.num_labels

    @property
    def clip_range(self) -> float | None:
        """Range to which x0_hat is clipped at each step, as the scheduler's config asks; None: no clipping."""
        cfg = self.scheduler.config
        return float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", False) else None

    @abstractmethod
    def predict(
        self, x: Tensor, t: Tensor, labels: Tensor, control_scale: float = 1.0, pretrained: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The network's predictions ``(out, out_pre)`` of the policy and of the pretrained model, each like ``x``
        ``[B, ...]``, at timestep ``t``: ``[]`` for the whole batch or ``[B]``, one per sample. What they predict is
        the scheduler's parametrisation: the noise eps for a DDPM/DDIM scheduler, the velocity v for a
        flow-matching one (:func:`ctrl.sampling.make_grid` reads the scheduler and steps accordingly).

        ``out = out_pre + control_scale * (out_theta - out_pre)``; 1 is the policy itself, 0 the
        pretrained model. Gradients of ``out_pre`` flow through ``x`` (never into frozen weights).
        ``pretrained=False``: the caller does not need ``out_pre``; a policy that can compute ``out``
        without the pretrained network's call skips it and returns None in its place.
        """

    def decode(self, x0: Tensor) -> Tensor:
        """What the reward and the evaluator see of a sample x_0: the sample itself here; a latent policy
        decodes its latents to images."""
        return x0

    def reward_labels(self, labels: Tensor) -> Tensor:
        """The label the reward scores for each condition ``[B]``: the condition itself here; a policy whose
        conditions are (prompt, class) pairs gives the class."""
        return labels

    def reward_prompts(self, labels: Tensor) -> list[str] | None:
        """The text of each condition ``[B]`` that a prompt-reading reward scores against: None here (these
        conditions have no text); a text-to-image policy gives each chain's prompt."""
        return None

    def condition_name(self, c: int) -> str:
        """A readable name of condition ``c`` (the captions of logged samples): ``label <c>`` here; a text-to-image
        policy gives its prompt."""
        return "null label" if c == self.null_label else f"label {c}"

    @property
    def num_reward_labels(self) -> int:
        """Size of the label set the reward scores (what a classifier reward must have)."""
        return self.num_labels

    def score(self, reward, x0: Tensor, labels: Tensor) -> Tensor:
        """The reward ``[B]`` of samples ``x0`` of conditions ``labels`` ``[B]``: the one way every algorithm and
        evaluation calls a reward on samples of this policy (:meth:`score_images` of the decoded samples)."""
        return self.score_images(reward, self.decode(x0), labels)

    def score_images(self, reward, images: Tensor, labels: Tensor) -> Tensor:
        """The reward ``[B]`` of already decoded samples: ``r(images, reward_labels(labels))``, with
        ``reward_prompts(labels)`` for a reward that reads prompts (:func:`ctrl.rewards.base.call_reward`)."""
        return call_reward(reward, images, self.reward_labels(labels), self.reward_prompts(labels))

    def networks(self) -> list[nn.Module]:
        """The networks :meth:`predict` calls at every step, the denoiser first (then a control head): what
        ``model.compile`` compiles, and the first is where denoiser calls are counted. Empty here: a policy whose
        steps are closed-form has no network to compile or count."""
        return []

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Trainable parameters as optimizer groups, each with its own ``lr`` and a ``name``."""

    def check_labels(self, labels, setting: str) -> None:
        """Refuse label indices outside ``0..num_labels-1`` with a message naming ``setting``."""
        bad = sorted({int(y) for y in labels if not 0 <= int(y) < self.num_labels})
        if bad:
            raise ValueError(
                f"{setting}: labels {bad} are outside the label set 0..{self.num_labels - 1} of this policy "
                f"(num_labels={self.num_labels}); use labels in that range."
            )
