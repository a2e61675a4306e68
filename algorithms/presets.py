"""The algorithms of trl's DDPO and AlignProp trainers, and DRaFT, by their own names: ctrl's plugins with those
methods' defaults (``model.algorithm.class_path: DDPO``). Each is its parent class with other default values, so
every setting stays the parent's, can be changed, and ``--print_config`` shows it.

The defaults below were read from trl's ``DDPOConfig`` and ``AlignPropConfig`` source (not pinned to one
release: they have not changed across the versions checked) and from the papers. What belongs to the sampler
rather than the algorithm is set on the module or the policy: ``model.num_steps`` (trl's ``sample_num_steps``
50), ``model.eta`` (``sample_eta`` 1.0), ``model.max_grad_norm`` (``train_max_grad_norm`` 1.0),
``model.accumulate`` (``train_gradient_accumulation_steps``), the policy's ``lora_lr`` (``train_learning_rate``)
and ``guidance_scale`` (``sample_guidance_scale``).
"""

from __future__ import annotations

from typing import Literal

from ctrl.algorithms.direct import DirectBackprop
from ctrl.algorithms.ppo import PPO


class DDPO(PPO):
    """PPO with DDPO's defaults (Black et al., *Training Diffusion Models with Reinforcement Learning*, ICLR 2024;
    trl's ``DDPOTrainer``). Where they differ from :class:`PPO`'s:

    - ``alpha`` 0: DDPO has no KL penalty.
    - ``clip_range`` 1e-4 (``train_clip_range``) with ``ratio_per_dimension`` true: DDPO averages the
      log-probabilities over the latent's dimensions, and its clip range is on that scale (on ctrl's summed
      log-probabilities, 1e-4 would clip nearly every ratio once the policy has moved within a rollout).
    - ``advantages`` "standardize" and ``advantage_clip`` 5.0 (``train_adv_clip_max``).
    - ``per_condition`` true: advantages per prompt, the closest to DDPO's ``per_prompt_stat_tracking`` (on in the
      paper's runs; off by default in trl). DDPO standardises by a buffer of each prompt's past rewards; here the
      baseline is the rollout's other chains of the same condition (``data.group_size`` chains each).

    ``inner_epochs`` 1 (``train_num_inner_epochs``), ``timestep_fraction`` 1.0 (``train_timestep_fraction``) and
    ``minibatch_size`` null (the whole rollout; trl's ``train_batch_size`` splits it) are PPO's defaults already.
    Args: as :class:`PPO`.
    """

    def __init__(
        self,
        alpha: float = 0.0,
        clip_range: float = 1e-4,
        inner_epochs: int = 1,
        minibatch_size: int | None = None,
        timestep_fraction: float = 1.0,
        steps_per_call: int = 1,
        advantages: Literal["center", "standardize"] = "standardize",
        per_condition: bool = True,
        advantage_clip: float | None = 5.0,
        ratio_per_dimension: bool = True,
    ):
        super().__init__(
            alpha=alpha,
            clip_range=clip_range,
            inner_epochs=inner_epochs,
            minibatch_size=minibatch_size,
            timestep_fraction=timestep_fraction,
            steps_per_call=steps_per_call,
            advantages=advantages,
            per_condition=per_condition,
            advantage_clip=advantage_clip,
            ratio_per_dimension=ratio_per_dimension,
        )


class AlignProp(DirectBackprop):
    """Reward backpropagation with AlignProp's defaults (Prabhudesai et al., *Aligning Text-to-Image Diffusion
    Models with Reward Backpropagation*, 2023; trl's ``AlignPropTrainer``). Where they differ from
    :class:`DirectBackprop`'s:

    - ``alpha`` 0: AlignProp has no KL penalty.
    - ``random_truncation`` true over the whole chain (``backprop_steps`` null): trl's ``truncated_backprop_rand``
      with ``truncated_rand_backprop_minmax`` (0, 50) on 50 steps.
    - ``unbiased_truncation`` false: AlignProp's estimator, in which a step nearer the noise carries gradient less
      often and so weighs less (true weights it by 1 / P(inside the window): the whole chain's gradient in
      expectation). trl draws the cut anew at every step, keeping each step's gradient with that probability;
      ctrl draws one window per rollout: the same expected gradient.

    trl samples with ``sample_eta`` 1.0 (``model.eta`` 1, the module's default); ``model.eta`` 0 is the
    deterministic DDIM chain. trl's fixed truncation (``truncated_backprop_rand`` false, the last step only) is
    ``backprop_steps`` 1 with ``random_truncation`` false, i.e. :class:`DRaFT`.
    Args: as :class:`DirectBackprop`.
    """

    def __init__(
        self,
        alpha: float = 0.0,
        backprop_steps: int | None = None,
        random_truncation: bool = True,
        unbiased_truncation: bool = False,
    ):
        super().__init__(
            alpha=alpha,
            backprop_steps=backprop_steps,
            random_truncation=random_truncation,
            unbiased_truncation=unbiased_truncation,
        )


class DRaFT(DirectBackprop):
    """Reward backpropagation with DRaFT's defaults (Clark et al., *Directly Fine-Tuning Diffusion Models on
    Differentiable Rewards*, ICLR 2024). Where they differ from :class:`DirectBackprop`'s:

    - ``alpha`` 0: DRaFT has no KL penalty.
    - ``backprop_steps`` 1: DRaFT-1, the gradient through the last step only (DRaFT-K: ``backprop_steps`` K).

    The paper samples with DDIM, 50 steps; its deterministic chain is ``model.eta`` 0. DRaFT-LV (several re-noised
    copies of the last step) is not implemented.
    Args: as :class:`DirectBackprop`.
    """

    def __init__(
        self,
        alpha: float = 0.0,
        backprop_steps: int | None = 1,
        random_truncation: bool = False,
        unbiased_truncation: bool = True,
    ):
        super().__init__(
            alpha=alpha,
            backprop_steps=backprop_steps,
            random_truncation=random_truncation,
            unbiased_truncation=unbiased_truncation,
        )
