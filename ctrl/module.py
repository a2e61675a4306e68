"""The LightningModule of RL fine-tuning: rollout -> algorithm.loss -> optimizer; evaluation hooks.

Data flows one way: the datamodule gives label batches, the policy rolls out chains through the
one sampler, the algorithm plugin turns them into a loss. Validation samples a fixed set of labels
with fixed noise and reports, beside the reward, what an independent evaluator says (accuracy,
macro-F1, Frechet distance), with the pretrained model's figures (label ignored) as the baseline.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ctrl.algorithms.base import Algorithm, AlgorithmContext
from ctrl.algorithms.rollouts import NonFiniteRewardWarning
from ctrl.callbacks import LogSamples
from ctrl.errors import SettingError, notice, renamed_setting
from ctrl.evaluation import Evaluator
from ctrl.policy.base import DiffusionPolicy
from ctrl.rewards.base import Reward
from ctrl.sampling import chain_kl, is_flow_scheduler, make_grid, sample, seeded_noise
from ctrl.seeds import derived_seed

SUMMARY_KEYS = ("accuracy", "macro_f1", "min_class_accuracy", "frechet", "frechet_floor", "kid", "reward", "kl")


def _qualified(obj) -> str:
    """``module.QualifiedName`` of ``obj``'s class: what a checkpoint records of the policy and algorithm."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def compile_backends() -> list[str]:
    """Every backend ``torch.compile`` takes by name here (``model.compile``): inductor, cudagraphs, the debugging
    ones (eager, aot_eager, ...) and any a library registered."""
    return sorted(torch.compiler.list_backends(exclude_tags=()))


def _innermost(err: BaseException) -> BaseException:
    """The error at the bottom of a chain of wrapped ones (dynamo wraps a backend's own in BackendCompilerFailed)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    return err


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. too many steps with non-finite rewards); the message says why and what to do."""


class ControlModule(L.LightningModule):
    """RL fine-tuning of a diffusion policy toward a reward, regularised by the KL to the pretrained model.

    Args:
        policy: the pretrained model plus its trainable control.
        reward: r(x0, y); for conditional control, a classifier's log p(y|x0).
        algorithm: the RL plugin, by class name in configs (``algorithm: DirectBackprop``).
        evaluator: the independent judge used by validate/test (None: reward and KL only).
        num_steps: sampling steps of a training rollout.
        eta: stochasticity of training rollouts: DDIM's eta in [0, 1] (1: DDPM), or for a flow-matching policy the
            SDE's noise level >= 0 (:mod:`ctrl.sampling`; Flow-GRPO uses 0.7). Log-probabilities and the KL need
            noise (eta > 0); eta = 0 is deterministic (DDIM, as AlignProp and DRaFT sample, or the flow's Euler
            ODE), controlled on every step,
            for an algorithm that backpropagates through the chain (DirectBackprop, AlignProp, DRaFT) at
            alpha 0: the KL of a deterministic chain is undefined, and evaluation reports no KL.
        eval_num_steps: sampling steps in validate/test/predict (default: num_steps); a list such as
            [25, 50, 100] evaluates at each (the first is the main one, logged as ``val/...``; the
            others as ``val/steps_<n>/...``), to measure robustness to the number of steps.
        control_scale: gamma at evaluation and prediction, ``out = out_pre + gamma (out_theta - out_pre)``.
        eval_pretrained: also evaluate the pretrained model (gamma 0: the label is ignored) as the baseline.
        gradient_checkpointing: recompute each step's network call in the backward pass.
        max_grad_norm: clip the gradient norm of each optimizer step to this (None: no clipping).
        accumulate: gradient accumulation (>= 1): the gradients of this many consecutive updates (the items
            of ``algorithm.updates``, each an optimizer step at 1), each scaled by 1 / accumulate, are summed
            into one optimizer step (clipped as a whole). With one update per rollout (DirectBackprop and its
            presets; PPO, RAFT, ContinuousTimePG with ``minibatch_size`` null and ``inner_epochs`` 1) that is
            one step every ``accumulate`` rollouts, the step of one rollout of ``accumulate`` times the chains
            (statistics of a rollout, such as advantage baselines, stay per rollout). With several updates
            per rollout (minibatches, inner epochs) it sums that many consecutive minibatches' gradients, as
            trl's ``train_gradient_accumulation_steps`` does, across rollouts when they do not divide. Under
            DDP gradients are all-reduced only on the update that steps. ``global_step`` counts optimizer
            steps; a checkpoint written between them holds the gradients gathered so far and resumes exactly;
            an incomplete group when training ends is dropped (with a notice).
        max_bad_steps: stop the run once this many training steps had a NaN or Inf reward (such samples
            are always dropped and counted; None: never stop).
        kl_log_interval: when the algorithm's objective has no KL (alpha = 0), rollouts skip the pretrained
            model; the KL of every this-many-th rollout is still computed afterwards (the pretrained model's
            pass without gradients; the rollout keeps the policy's means for it) and logged as ``train/kl``
            (None: never).
        weight_decay: weight decay of the default optimizer (AdamW).
        optimizer: any torch optimizer, the LightningCLI way (``class_path: torch.optim.SGD`` with its
            ``init_args``); it receives the parameter groups with their own learning rates (per part, set in
            the policy and the algorithm). Default: AdamW with ``weight_decay``.
        lr_scheduler: a torch learning-rate scheduler (e.g. ``torch.optim.lr_scheduler.LinearLR``), stepped
            once per rollout (once every ``accumulate`` rollouts: per rollout of the accumulated batch), so its
            ``total_iters`` / ``T_max`` count those. Default: constant rates.
        compile: compile the policy's networks (:meth:`DiffusionPolicy.networks`: the denoiser, a control head) with
            ``torch.compile``: true for its default backend (inductor: a C++ compiler on CPU, triton on a GPU), or
            a backend's name (``torch.compiler.list_backends``). The first calls of each shape and adapter state
            compile (tens of seconds to minutes); later ones run the compiled code. A backend that cannot compile
            on the run's device is refused when the run starts, before any step. Checkpoints are unchanged.
        guidance: the old name of ``control_scale`` (works, with a notice; classifier-free guidance is the
            policy's ``guidance_scale``).
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        reward: Reward,
        algorithm: Algorithm,
        evaluator: Evaluator | None = None,
        num_steps: int = 10,
        eta: float = 1.0,
        eval_num_steps: int | list[int] | None = None,
        control_scale: float = 1.0,
        eval_pretrained: bool = True,
        gradient_checkpointing: bool = False,
        max_grad_norm: float | None = 1.0,
        accumulate: int = 1,
        max_bad_steps: int | None = 10,
        kl_log_interval: int | None = 10,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool | str = False,
        guidance: float | None = None,
    ):
        super().__init__()
        control_scale = renamed_setting(type(self), "guidance", guidance, "control_scale", control_scale, 1.0)
        # An algorithm may take several optimizer steps per rollout (PPO's inner epochs).
        self.automatic_optimization = False
        steps = eval_num_steps if isinstance(eval_num_steps, list) else [eval_num_steps or num_steps]
        self._check_settings(policy, reward, algorithm, num_steps, eta, steps)
        self._check_training(max_grad_norm, accumulate, max_bad_steps, kl_log_interval)
        self.compile_backend, self._compiled = self._check_compile(compile, policy), False
        self._num_stochastic = len(make_grid(policy.scheduler, num_steps, eta).controlled_steps)
        self.algorithm_context = AlgorithmContext(
            policy.num_labels, self._num_stochastic, gradient_checkpointing=gradient_checkpointing
        )
        algorithm.setup(policy, reward, self.algorithm_context)
        self._check_learning_rates(policy, algorithm)
        self.policy, self.reward, self.algorithm, self.evaluator = policy, reward, algorithm, evaluator
        self.num_steps, self.eta = num_steps, eta
        self.eval_num_steps, self.extra_eval_num_steps = steps[0], steps[1:]
        self.control_scale, self.eval_pretrained = control_scale, eval_pretrained
        self.gradient_checkpointing, self.weight_decay = gradient_checkpointing, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.max_grad_norm, self.max_bad_steps, self.bad_steps = max_grad_norm, max_bad_steps, 0
        self.accumulate, self.kl_log_interval = accumulate, kl_log_interval
        # updates whose gradients wait for the next optimizer step, rollouts since the scheduler's last step
        self._pending_updates, self._pending_rollouts = 0, 0
        self._restored_grads: dict[str, Tensor] = {}  # a checkpoint's pending gradients, until training starts
        self._rollouts = (0, 0)  # rollouts this process trained on, chains in the last
        if evaluator is not None:
            evaluator.attach(self)
        self._eval_outputs: dict[str, list] = {}
        # Checkpoints hold the trainable weights only (on_save_checkpoint): the frozen ones come from
        # the pretrained model, which for Stable Diffusion is gigabytes.
        self.strict_loading = False
        # per stage (val, test) the pretrained model's figures and what they were sampled at (_evaluation_key)
        self.baselines, self.baseline_keys, self._epoch_key = {}, {}, None
        self.last_metrics, self.last_stage = {}, "val"  # the last evaluation's figures and its stage
        # what LogSamples logs, None until there is one: the last training rollout (conditions [B], x0 [B, ...],
        # detached) and the last evaluation's samples (stage, images [N, C, H, W], conditions [N], rewards [N])
        self.rollout_samples, self.eval_samples = None, None

    def _check_settings(self, policy, reward, algorithm, num_steps, eta, eval_steps) -> None:
        """The sampler's settings against the policy, reward and algorithm (one message each)."""
        name = type(algorithm).__name__
        if is_flow_scheduler(policy.scheduler):
            if eta < 0:
                raise SettingError(
                    self, "eta", f"is the flow sampler's noise level and must be >= 0 (0: the Euler ODE), got {eta}."
                )
        elif not 0 <= eta <= 1:
            raise SettingError(self, "eta", f"must lie in [0, 1] (0: deterministic DDIM, 1: DDPM), got {eta}.")
        if eta == 0 and not algorithm.requires_grad_through_sampler:
            raise SettingError(
                self,
                "eta",
                f"is {eta}: {name} does not backpropagate through the chain, and RL fine-tuning by its rollouts "
                "needs a stochastic sampler (log-probabilities and the KL to the pretrained chain exist only for "
                "eta > 0); set it in (0, 1], e.g. 1.0. (eta 0, deterministic DDIM, trains with DirectBackprop, "
                "AlignProp or DRaFT at alpha 0.)",
            )
        if eta == 0 and algorithm.alpha > 0:
            raise SettingError(
                algorithm,
                "alpha",
                f"is {algorithm.alpha} but model.eta is 0: the KL of a deterministic chain to the pretrained one "
                "is undefined (no step has a density); set alpha 0 (as AlignProp and DRaFT), or eta in (0, 1].",
                value=algorithm.alpha,
            )
        if num_steps < 2:
            raise SettingError(
                self, "num_steps", f"must be at least 2 (the last step is deterministic), got {num_steps}."
            )
        limit = int(policy.scheduler.config.num_train_timesteps)
        if num_steps > limit:
            raise SettingError(
                self,
                "num_steps",
                f"is {num_steps}, more than the {limit} timesteps the pretrained model was trained with (its "
                f"scheduler's num_train_timesteps); set it to at most {limit}.",
            )
        if reward.num_labels is not None and reward.num_labels != policy.num_reward_labels:
            raise SettingError(
                self,
                "reward",
                f"scores {reward.num_labels} labels but the policy has "
                f"{policy.num_reward_labels} (policy.num_labels); make them equal, or use a classifier "
                "trained on the policy's label set.",
            )
        if not eval_steps or min(eval_steps) < 2:
            raise SettingError(self, "eval_num_steps", f"must be at least 2 (each entry), got {eval_steps}.")
        if len(set(eval_steps)) != len(eval_steps):
            raise SettingError(self, "eval_num_steps", f"give distinct step counts, got {eval_steps}.")
        if max(eval_steps) > limit:
            raise SettingError(
                self,
                "eval_num_steps",
                f"is {eval_steps}, more than the {limit} timesteps the pretrained model was trained with; give "
                f"each entry at most {limit}.",
            )

    def _check_training(self, max_grad_norm, accumulate, max_bad_steps, kl_log_interval) -> None:
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise SettingError(self, "max_grad_norm", f"must be > 0 or null, got {max_grad_norm}.")
        if accumulate < 1:
            raise SettingError(
                self, "accumulate", f"must be >= 1 (updates per optimizer step; 1: no accumulation), got {accumulate}."
            )
        if max_bad_steps is not None and max_bad_steps < 1:
            raise SettingError(self, "max_bad_steps", f"must be >= 1 or null (never stop), got {max_bad_steps}.")
        if kl_log_interval is not None and kl_log_interval < 1:
            raise SettingError(self, "kl_log_interval", f"must be >= 1 (rollouts) or null, got {kl_log_interval}.")

    def _check_compile(self, compile: bool | str, policy: DiffusionPolicy) -> str | None:
        """The torch.compile backend ``compile`` names (None: no compilation)."""
        if compile is False:
            return None
        backend = "inductor" if compile is True else compile
        if backend not in compile_backends():
            raise SettingError(
                self,
                "compile",
                f"'{compile}' is not a torch.compile backend; give true (inductor), false, or one of "
                f"{compile_backends()}.",
            )
        if not policy.networks():
            raise SettingError(
                self,
                "compile",
                f"is {compile}, but {type(policy).__name__} calls no network (its steps are closed-form); set it "
                "false.",
            )
        return backend

    def _compile_networks(self) -> None:
        """Compile the policy's networks in place (their parameters and state-dict names stay as they are), once a
        small function compiled and ran forward and backward with the backend on the run's device: a backend that
        cannot compile there is refused here, before any step, not in the middle of the first rollout."""
        device = self.trainer.strategy.root_device
        try:
            probe = torch.compile(lambda v: torch.sin(v) * 2, backend=self.compile_backend, fullgraph=True)
            probe(torch.ones(4, device=device, requires_grad=True)).sum().backward()
        except Exception as err:  # inductor raises many kinds: no C++ compiler, no triton, an unsupported device
            err = _innermost(err)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise SettingError(
                self,
                "compile",
                f"torch.compile with backend '{self.compile_backend}' cannot compile on {device} "
                f"({type(err).__name__}: {first}); set it false, or install what the backend needs (inductor: a "
                "C++ compiler on CPU, triton on a GPU).",
            ) from None
        for network in self.policy.networks():
            network.compile(backend=self.compile_backend)
        self._compiled = True

    @staticmethod
    def _check_learning_rates(policy, algorithm) -> None:
        """Every trained part's learning rate must be > 0. The error names the part's own setting: ``<part>_lr``
        (``head_lr`` for the group named ``head``), or ``lr`` for an owner with one rate."""
        for owner in (policy, algorithm):
            settings = inspect.signature(type(owner).__init__).parameters
            for group in owner.param_groups():
                lr, part = group.get("lr"), group.get("name", "")
                if lr is None or lr > 0:
                    continue
                key = next((k for k in (f"{part}_lr", "lr") if k in settings), "")
                raise SettingError(
                    owner,
                    key,
                    f"must be > 0, got {lr} (the learning rate of the '{part}' part); to keep a part as it is, "
                    "switch it off instead.",
                    value=lr,
                )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        n = getattr(datamodule, "num_labels", None)
        if n is not None and n != self.policy.num_labels:
            raise ValueError(
                f"data.num_labels={n} but model.policy.num_labels={self.policy.num_labels}; the labels "
                "drawn for training must be the policy's label set: make them equal."
            )
        self.algorithm.check_data(getattr(datamodule, "hparams", {}).get("group_size"))
        if self.compile_backend and not self._compiled:  # once, whichever stage comes first
            self._compile_networks()
        if self.trainer.world_size > 1:
            self.algorithm_context.sum_over_ranks = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")
            self.algorithm_context.gather = lambda t: self.trainer.strategy.all_gather(t)
            self.algorithm_context.rank = self.global_rank

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """One rollout of this process's chains ``(labels [b], noise seeds [b])`` and the algorithm's updates.

        Every random draw of the step is a function of the batch: the chains' noise comes from their
        seeds, and the algorithm's own draws (minibatch order, timestep subsets, truncation) from the
        global generator reseeded from the first chain's seed (another stream than its noise) inside
        ``fork_rng`` (the generator outside the step is left as it was), so a resumed run and a run split
        over ranks draw exactly what the uninterrupted single-process run draws for the same chains.
        """
        labels, seeds = batch
        self._rollouts = (self._rollouts[0] + 1, len(labels))
        with (
            warnings.catch_warnings(record=True) as caught,
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
        ):
            warnings.simplefilter("always", NonFiniteRewardWarning)
            torch.manual_seed(derived_seed("algorithm draws", int(seeds[0])))
            self._train_on(labels, seeds)
        for w in caught:  # pass every warning on; count the steps with non-finite rewards
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if any(issubclass(w.category, NonFiniteRewardWarning) for w in caught):
            self.bad_steps += 1
            self.log("train/bad_steps", float(self.bad_steps))
            if self.max_bad_steps is not None and self.bad_steps >= self.max_bad_steps:
                raise RunStopped(
                    f"the reward returned NaN or Inf in {self.bad_steps} training steps "
                    f"(model.max_bad_steps={self.max_bad_steps}); the run stops here, its last "
                    "checkpoint is intact. Fix the reward, or raise model.max_bad_steps."
                )

    def _train_on(self, labels: Tensor, seeds: Tensor) -> None:
        optimizer = self.optimizers()
        plan, pretrained = self.algorithm.gradient_plan(self._num_stochastic), self.algorithm.needs_pretrained
        # a deterministic chain has no KL; at alpha 0 it is logged every kl_log_interval rollouts, afterwards
        logs_kl = not pretrained and self.eta > 0 and self.kl_log_interval
        logs_kl = bool(logs_kl) and (self._rollouts[0] - 1) % self.kl_log_interval == 0
        with torch.set_grad_enabled(plan.steps > 0 or plan.kl_steps > 0):
            trajectory = sample(
                self.policy,
                labels,
                self.num_steps,
                self.eta,
                grad_steps=plan.steps,
                grad_weights=plan.weights,
                kl_grad_steps=plan.kl_steps,
                noise=self._fixed_noise(seeds, self.num_steps),
                gradient_checkpointing=self.gradient_checkpointing,
                pretrained=pretrained,
                keep_means=logs_kl,
            )
        # a copy: x0 is a view of all the chain's latents, which it would keep alive into the next rollout
        self.rollout_samples = (labels, trajectory.samples.detach().clone())
        stats = {}
        if logs_kl:  # the rollout policy's, before updates; a policy that evaluated the pretrained model anyway has it
            kl = trajectory.kl if trajectory.kl is not None else chain_kl(self.policy, trajectory)
            stats["kl"], trajectory.means = kl.sum(1).mean(), None  # no algorithm reads the means
        out = None
        for batch in self.algorithm.updates(trajectory, self.policy, self.reward):
            out = self._accumulate(optimizer, batch)
        self._pending_rollouts += 1
        scheduler = self.lr_schedulers()
        if self._pending_rollouts == self.accumulate:
            self._pending_rollouts = 0
            if scheduler is not None:
                scheduler.step()
        if out is None:  # no finite reward in this rollout (already reported): nothing to learn from
            return
        stats.update(out)
        self.log_dict({f"train/{k}": v.detach() for k, v in stats.items()}, prog_bar=True, batch_size=len(labels))

    def _accumulate(self, optimizer, batch) -> dict[str, Tensor]:
        """Backpropagate one update's loss, scaled by 1 / accumulate, into the gradients gathered since the last
        optimizer step; step once ``accumulate`` updates are in. Returns the update's statistics."""
        self._pending_updates += 1
        steps = self._pending_updates == self.accumulate
        backward = self.manual_backward if self.accumulate == 1 else self._scaled_backward
        # Under DDP the gradients stay on each rank (no all-reduce) until the update that steps.
        with contextlib.nullcontext() if steps else optimizer.toggle_model(sync_grad=False):
            out = self.algorithm.backward_loss(batch, self.policy, self.reward, backward)
        if steps:
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()
            self._pending_updates = 0
        return out

    def _scaled_backward(self, loss: Tensor) -> None:
        self.manual_backward(loss / self.accumulate)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before validating during fit: those of an unfinished accumulation group
        # must survive it.
        if self._pending_updates == 0:
            super().on_validation_model_zero_grad()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ctrl"] = {
            "bad_steps": self.bad_steps,
            "baselines": self.baselines,
            "baseline_keys": self.baseline_keys,
            "last_metrics": self.last_metrics,
            "last_stage": self.last_stage,
            "classes": {"policy": _qualified(self.policy), "algorithm": _qualified(self.algorithm)},
            "accumulation": self._accumulation_state(),
        }
        frozen = {n for n, _ in self.named_parameters()} - self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def _accumulation_state(self) -> dict:
        """The counters of an unfinished accumulation group and its gradients so far (trainable parameters only).
        Under DDP each rank holds its own until the step's all-reduce: the checkpoint keeps their mean, which
        every rank resumes with (the step's all-reduce averages, so it gives the same update)."""
        state = {"updates": self._pending_updates, "rollouts": self._pending_rollouts, "grads": {}}
        if self._pending_updates == 0:
            return state
        names = self.trainable_names()
        multi = self._trainer is not None and self._trainer.world_size > 1
        for name, p in self.named_parameters():
            if name in names and p.grad is not None:
                grad = p.grad.detach().clone()
                state["grads"][name] = self._trainer.strategy.reduce(grad, reduce_op="mean") if multi else grad
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ctrl", {})
        self._check_classes(state.get("classes"))
        # strict_loading is off because frozen weights are not saved; trainable ones must all be there.
        missing = sorted(n for n in self.trainable_names() if n not in checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. "
                f"'{missing[0]}'): it was written with another policy or algorithm config; resume "
                "with the config that wrote it."
            )
        self.bad_steps = state.get("bad_steps", 0)
        old = {"val": state["baseline"]} if state.get("baseline") else {}  # written before the test seeds had theirs
        self.baselines, self.last_metrics = state.get("baselines", old), state.get("last_metrics", {})
        self.baseline_keys = state.get("baseline_keys", {})  # none in older checkpoints: sampled again once
        self.last_stage = state.get("last_stage", "val")
        accumulation = state.get("accumulation", {})
        self._pending_updates, self._pending_rollouts = accumulation.get("updates", 0), accumulation.get("rollouts", 0)
        self._restored_grads = accumulation.get("grads", {})

    def on_train_start(self) -> None:
        # Lightning zeroes the gradients as a stage starts, after the checkpoint was read: the gradients of an
        # unfinished accumulation group go back in here.
        grads, self._restored_grads = self._restored_grads, {}
        for name, p in self.named_parameters():
            if name in grads:
                p.grad = grads[name].to(p.device, p.dtype)

    def _check_classes(self, saved: dict | None) -> None:
        """Refuse a checkpoint of another policy class, or (to resume training) of another algorithm class. A
        checkpoint written before the classes were recorded passes (the check of its weights still applies)."""
        if not saved:
            return
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == "fit"
        path = f"'{trainer.ckpt_path}'" if trainer is not None and trainer.ckpt_path else "the checkpoint"
        # Evaluating or sampling needs the policy's weights only; resuming training needs the algorithm too.
        for part, checked in (("policy", True), ("algorithm", fitting)):
            ours = _qualified(getattr(self, part))
            if checked and saved.get(part, ours) != ours:
                theirs = saved[part].rpartition(".")[2]
                hint = (
                    " Starting another algorithm from a checkpoint's weights is a separate setting, not supported "
                    "yet: start a new run."
                    if part == "algorithm"
                    else ""
                )
                raise SettingError(
                    "--ckpt_path",
                    "",
                    f"{path} was written by a run with model.{part} {theirs} ({saved[part]}), but this config's is "
                    f"{ours.rpartition('.')[2]}; resume with the config that wrote it.{hint}",
                )

    def trainable_names(self) -> set[str]:
        """Names of the parameters the optimizer trains (the policy's and the algorithm's groups). Not
        ``requires_grad``: peft switches that off while adapters are disabled for the reference model."""
        ids = {id(p) for g in self.policy.param_groups() + self.algorithm.param_groups() for p in g["params"]}
        return {n for n, p in self.named_parameters() if id(p) in ids}

    def configure_optimizers(self):
        groups = self.policy.param_groups() + self.algorithm.param_groups()
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- evaluation -----------------------------------------------------------------------------
    def _fixed_noise(self, seeds: Tensor, num_steps: int) -> Tensor:
        return seeded_noise(seeds, num_steps, self.policy.sample_shape).to(self.device)

    @torch.no_grad()
    def generate(self, labels: Tensor, seeds: Tensor, control_scale: float, num_steps: int | None = None):
        """Samples for ``labels`` with the noise fixed by ``seeds``: a Trajectory (eta as in training)."""
        n = num_steps or self.eval_num_steps
        return sample(self.policy, labels, n, self.eta, control_scale=control_scale, noise=self._fixed_noise(seeds, n))

    def _eval_step(self, batch, stage: str) -> None:
        labels, seeds = batch
        self.policy.check_labels(labels.tolist(), "evaluation labels")
        runs = {"policy": (self.control_scale, self.eval_num_steps)}
        runs.update({f"steps_{n}": (self.control_scale, n) for n in self.extra_eval_num_steps})
        if self.eval_pretrained and not self._baseline_holds(stage):
            runs["pretrained"] = (0.0, self.eval_num_steps)
        for name, (gamma, n) in runs.items():
            traj = self.generate(labels, seeds, gamma, n)
            images, reward_labels = self.policy.decode(traj.samples), self.policy.reward_labels(labels)
            rewards = self.policy.score_images(self.reward, images, labels)
            outputs = (images, reward_labels, rewards, traj.kl.sum(1), labels, seeds)
            self._eval_outputs.setdefault(name, []).append(outputs)

    def _gathered(self, outs: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """This epoch's evaluation outputs of all ranks, on the CPU, each sample once: DistributedSampler pads
        the last ranks with repeats, which the seeds (one per sample) identify."""
        tensors = [torch.cat(x) for x in zip(*outs)]
        if self.trainer.world_size > 1:
            tensors = [self.all_gather(t).flatten(0, 1) for t in tensors]
        seeds = tensors[-1]
        unique, which = torch.unique(seeds, return_inverse=True)
        positions = torch.arange(len(seeds), device=seeds.device)
        keep = torch.full_like(unique, len(seeds)).scatter_reduce(0, which, positions, "amin")  # first of each seed
        return tuple(t[keep].cpu() for t in tensors[:-1])

    def _eval_epoch_end(self, stage: str) -> None:
        results = {}
        for name, outs in self._eval_outputs.items():
            samples, labels, rewards, kl, conditions = self._gathered(outs)
            metrics = {"reward": rewards.mean(), "kl": kl.mean()} if self.eta > 0 else {"reward": rewards.mean()}
            if self.evaluator is not None:
                metrics.update(self.evaluator.evaluate(samples, labels))
            confusion = metrics.pop("confusion", None)
            results[name] = {k: float(v) for k, v in metrics.items()}
            prefix = {"policy": f"{stage}/", "pretrained": f"{stage}/pretrained_"}.get(name, f"{stage}/{name}/")
            # every rank holds the same gathered figures: nothing to reduce
            self.log_dict({prefix + k: v for k, v in results[name].items()})
            if name == "policy":
                self.eval_samples = (stage, samples, conditions, rewards)
                self._log_confusion(stage, confusion)
        self._eval_outputs = {}
        if "pretrained" in results:
            self.baselines[stage], self.baseline_keys[stage] = results["pretrained"], self._epoch_key
        self.last_metrics, self.last_stage = results.get("policy", {}), stage

    @rank_zero_only
    def _log_confusion(self, stage: str, confusion: Tensor | None) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if confusion is not None and hasattr(experiment, "add_text"):
            experiment.add_text(f"{stage}/confusion", "    " + str(confusion.tolist()), self.global_step)

    def configure_callbacks(self):
        # Evaluation samples are logged without a LogSamples in the config too; one there keeps its settings.
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return [] if any(isinstance(c, LogSamples) for c in callbacks) else [LogSamples()]

    def _evaluation_key(self, stage: str) -> str | None:
        """What the pretrained model's figures on ``stage`` depend on besides its weights: the step count, eta and
        the evaluated (label, seed) pairs of the stage's dataset (every rank holds the whole dataset). None when the
        dataset has no length: its baseline is sampled at every evaluation."""
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        dataset = getattr(loaders, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            return None
        pairs = [dataset[i] for i in range(len(dataset))]
        return hashlib.sha256(repr((self.eval_num_steps, self.eta, pairs)).encode()).hexdigest()[:20]

    def _baseline_holds(self, stage: str) -> bool:
        """The kept pretrained figures of ``stage`` were sampled as this evaluation samples (its key)."""
        key = self._epoch_key
        return stage in self.baselines and key is not None and self.baseline_keys.get(stage) == key

    def on_validation_epoch_start(self):
        self._epoch_key = self._evaluation_key("val")

    def on_test_epoch_start(self):
        self._epoch_key = self._evaluation_key("test")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def summary(self) -> str:
        """A table of the last evaluation: the fine-tuned policy beside the pretrained model on the same seeds."""
        if not self.last_metrics:
            return "no evaluation has run"
        baseline = self.baselines.get(self.last_stage)
        lines = [f"{'metric':<20}{'pretrained':>12}{'fine-tuned':>12}"]
        keys = [k for k in SUMMARY_KEYS if k in self.last_metrics]
        for key in keys + [k for k in self.last_metrics if k not in keys]:
            base = f"{baseline[key]:.4f}" if baseline and key in baseline else "-"
            lines.append(f"{key:<20}{base:>12}{self.last_metrics[key]:>12.4f}")
        return "\n".join(lines)

    def on_train_end(self):
        if self._pending_updates and self.global_rank == 0:
            n = self._pending_updates
            notice(
                f"the gradients of the last {n} update{'s' if n > 1 else ''} were not applied: training ended inside "
                f"a group of model.accumulate={self.accumulate} updates (a checkpoint written now keeps them; a run "
                "resumed from it that trains longer applies them)."
            )
        self._notice_if_epochs_capped_steps()
        if self.trainer.world_size > 1:  # every rank reports (the logs of a multi-node job show each one)
            print(
                f"ctrl: rank {self.global_rank} of {self.trainer.world_size} trained {self._rollouts[0]} rollouts "
                f"of {self._rollouts[1]} chains",
                flush=True,
            )

    def _notice_if_epochs_capped_steps(self) -> None:
        """Lightning stops at whichever of max_epochs and max_steps comes first, silently: the configs' max_epochs 1
        ends a run asked for more optimizer steps than one epoch holds."""
        trainer = self.trainer
        max_steps, max_epochs, done = trainer.max_steps, trainer.max_epochs, trainer.global_step
        if (
            self.global_rank == 0
            and 0 < done < max_steps
            and max_epochs is not None
            and trainer.current_epoch >= max_epochs
        ):
            notice(
                f"training stopped at trainer.max_epochs={max_epochs} after {done} optimizer steps, before "
                f"trainer.max_steps={max_steps}: raise trainer.max_epochs (or data.batches_per_epoch) to train them."
            )

    def _heading(self) -> str:
        seeds = {
            "val": "validation seeds: where settings are chosen",
            "test": "test seeds: disjoint from training and validation",
        }[self.last_stage]
        return f"{seeds} (control scale {self.control_scale}, {self.eval_num_steps} steps)"

    def on_fit_end(self):
        self.print(f"\nevaluation after fine-tuning on the {self._heading()}\n" + self.summary())

    def on_validation_end(self):
        if not self.trainer.state.fn == "fit":
            self.print(f"\nevaluation on the {self._heading()}\n" + self.summary())

    def on_test_end(self):
        self.print(f"\nevaluation on the {self._heading()}\n" + self.summary())

    # -- prediction -----------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx):
        labels, seeds = batch
        self.policy.check_labels(labels.tolist(), "data.predict_labels")
        samples = self.policy.decode(self.generate(labels, seeds, self.control_scale).samples)
        return {"samples": samples.cpu(), "labels": labels.cpu()}
