"""Conditions for RL fine-tuning: labels drawn from a label prior, and fixed evaluation labels."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ctrl.errors import SettingError, setting
from ctrl.seeds import TEST, chain_seed, check_seeds


def check_prior(prior: list[float] | None, num_labels: int) -> torch.Tensor:
    """The prior as a ``[num_labels]`` tensor (uniform when None); one clear message (ValueError) when it is not a
    distribution, which the class whose setting gave it names."""
    if prior is None:
        return torch.full((num_labels,), 1.0 / num_labels)
    p = torch.tensor(prior, dtype=torch.float64)
    if p.ndim != 1 or len(p) != num_labels:
        raise ValueError(
            f"has {len(prior)} entries but there are {num_labels} labels; give one probability per label."
        )
    if (p < 0).any() or not torch.isfinite(p).all() or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"{prior} is not a probability distribution (entries must be >= 0 and sum "
            f"to 1; they sum to {float(p.sum()):.6g})."
        )
    return p.float()


class _PriorChains(Dataset):
    """Item k is chain k of the epoch as ``(label, noise seed)``; chains ``[b*B, (b+1)*B)`` form global
    batch b, whose labels are stratified: the counts follow the prior as closely as a batch allows
    (systematic sampling), in a random order; with ``group_size`` G, B / G labels are drawn so and each
    is repeated G times (consecutive chains). Seeded by (seed, epoch, b): reproducible, and a new
    draw each epoch (``epoch`` is set by :class:`ResumableLoader`)."""

    def __init__(self, prior: torch.Tensor, batch_size: int, num_batches: int, seed: int, group_size: int = 1):
        self.cdf, self.batch_size, self.num_batches, self.seed = prior.cumsum(0), batch_size, num_batches, seed
        self.group_size = group_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batch_labels(self, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + b)
        draws = self.batch_size // self.group_size
        u = (torch.arange(draws) + torch.rand(1, generator=g)) / draws
        labels = torch.searchsorted(self.cdf, u.clamp(max=float(self.cdf[-1]) - 1e-7))
        return labels[torch.randperm(draws, generator=g)].repeat_interleave(self.group_size)

    def __getitem__(self, k: int) -> tuple[int, int]:
        b, j = divmod(k, self.batch_size)
        return int(self.batch_labels(b)[j]), chain_seed(self.seed, self.epoch, k)


class ResumableLoader(DataLoader):
    """The training loader: it resumes mid-epoch where a checkpoint left off (Lightning saves and restores
    its ``state_dict``), and sets the dataset's epoch so that each epoch draws new chains.

    ``progress`` returns ``(epoch, batches consumed in it)``; it is read from the trainer rather than
    counted here, because Lightning fetches one batch ahead of the one being trained on.
    """

    def __init__(self, dataset: _PriorChains, batch_size: int = 1, progress=None, **kwargs):
        # **kwargs: Lightning rebuilds the loader with a DistributedSampler under DDP
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self._progress, self._skip = progress or (lambda: (0, 0)), 0

    def state_dict(self) -> dict:
        epoch, consumed = self._progress()
        return {"epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["consumed"] if state["consumed"] < len(self) else 0

    def __iter__(self):
        self.dataset.epoch = self._progress()[0]
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):  # labels and seeds only: skipping costs nothing
            next(iterator)
        return iterator


class _FixedLabels(Dataset):
    """``(label, seed)`` pairs: ``per_label`` of each label; the seed fixes that sample's noise."""

    def __init__(self, labels: list[int], per_label: int, seed: int):
        self.items = [(y, seed + j * len(labels) + i) for j in range(per_label) for i, y in enumerate(labels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.items[i]


class LabelsDataModule(L.LightningDataModule):
    """Labels for conditional control.

    Args:
        num_labels: size of the label set (None: the policy's ``num_labels``, read when the run starts).
        prior: probability of each label during training (uniform when omitted).
        batch_size: rollouts per training step, over all processes (each of W processes draws batch_size / W).
        group_size: chains per drawn label in a training batch (batch_size / group_size labels are drawn,
            each repeated): per-condition advantage baselines (PPO's ``per_condition``, DDPO's per-prompt
            statistics) need several chains of a condition in one batch.
        batches_per_epoch: training steps per epoch.
        eval_per_label: samples per label in validate/test (fixed seeds: the same noise every time).
        eval_batch_size: samples per evaluation batch.
        predict_labels: labels that ``ctrl predict`` samples (all labels when omitted).
        predict_per_label: samples per label for ``ctrl predict``.
        seed: seeds the label draws and the training chains' noise (:mod:`ctrl.seeds`).
        val_seed: the first validation seed (``validate``, and the evaluation during ``fit``: where settings
            are chosen); sample i has seed ``val_seed + i``. Default 7919.
        test_seed: the first test seed (``ctrl test``: where reported numbers come from). Default
            ``2**30 + 7919``. The three sets are disjoint ranges, each checked (:mod:`ctrl.seeds`).
    """

    def __init__(
        self,
        num_labels: int | None = 10,
        prior: list[float] | None = None,
        batch_size: int = 32,
        batches_per_epoch: int = 100,
        eval_per_label: int = 50,
        eval_batch_size: int = 250,
        predict_labels: list[int] | None = None,
        predict_per_label: int = 8,
        seed: int = 0,
        group_size: int = 1,
        val_seed: int | None = None,
        test_seed: int | None = None,
    ):
        super().__init__()
        for name in (
            "batch_size",
            "group_size",
            "batches_per_epoch",
            "eval_per_label",
            "eval_batch_size",
            "predict_per_label",
        ):
            if locals()[name] < 1:
                raise SettingError(self, name, f"must be at least 1, got {locals()[name]}.")
        if batch_size % group_size:
            raise SettingError(
                self,
                "batch_size",
                f"{batch_size} is not a multiple of group_size {group_size} (each drawn condition fills a group "
                "of chains); make it one.",
            )
        self.save_hyperparameters()
        # the same evaluation chains whatever the run's seed: runs with other seeds are compared on them
        self.val_seed = 7919 if val_seed is None else val_seed
        self.test_seed = TEST.start + 7919 if test_seed is None else test_seed
        self.num_labels: int | None = None
        if num_labels is not None:
            self._bind(num_labels)

    def _bind(self, num_labels: int) -> None:
        """Fix the label set: check the prior, the requested prediction labels and the evaluation seeds against it."""
        h = self.hparams
        with setting(self, "prior", h.prior):
            self.prior = check_prior(h.prior, num_labels)
        bad = [y for y in (h.predict_labels or []) if not 0 <= y < num_labels]
        if bad:
            raise SettingError(
                self,
                "predict_labels",
                f"{bad} are outside the label set 0..{num_labels - 1}; request labels in that range.",
            )
        n = num_labels * h.eval_per_label
        for key, first, kind in (("val_seed", self.val_seed, "validation"), ("test_seed", self.test_seed, "test")):
            try:
                check_seeds(key, first, n, kind)
            except ValueError as err:  # worded "<key>=<first> gives ...": the key is the SettingError's
                raise SettingError(self, key, str(err).removeprefix(f"{key}="), value=first) from None
        self.num_labels = num_labels

    def setup(self, stage: str) -> None:
        if self.num_labels is not None:
            return
        policy = getattr(getattr(self.trainer, "lightning_module", None), "policy", None)
        if getattr(policy, "num_labels", None) is None:
            raise ValueError(
                "data.num_labels is not set and there is no policy to take it from; give data.num_labels."
            )
        try:
            self._bind(policy.num_labels)  # the policy's conditions (a text-to-image policy's prompts x classes)
        except SettingError as err:  # at trainer time this datamodule is the config's top-level `data`
            raise SettingError("data", err.key, err.problem) from None

    def train_dataloader(self) -> DataLoader:
        """Batches of ``(labels [b], noise seeds [b])``, b = batch_size / world size: under DDP, rank r gets
        the chains r, r + W, ... of each global batch (a DistributedSampler without shuffling: Lightning's
        own would shuffle across batches)."""
        h = self.hparams
        world = self.trainer.world_size if self.trainer is not None else 1
        if h.batch_size % world:
            raise ValueError(
                f"data.batch_size={h.batch_size} is the global batch and must divide evenly among the "
                f"{world} processes (trainer.devices x trainer.num_nodes); make it a multiple of {world}."
            )
        dataset = _PriorChains(self.prior, h.batch_size, h.batches_per_epoch, h.seed, h.group_size)
        sampler = None
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return ResumableLoader(dataset, h.batch_size // world, self._progress, sampler=sampler, shuffle=False)

    def _progress(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 0
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _fixed(self, labels: list[int], per_label: int, batch_size: int, first_seed: int) -> DataLoader:
        return DataLoader(_FixedLabels(labels, per_label, first_seed), batch_size=batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._fixed(list(range(self.num_labels)), h.eval_per_label, h.eval_batch_size, self.val_seed)

    def test_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._fixed(list(range(self.num_labels)), h.eval_per_label, h.eval_batch_size, self.test_seed)

    def predict_dataloader(self) -> DataLoader:
        """Samples to look at, on validation seeds (nothing is reported from them)."""
        h = self.hparams
        labels = h.predict_labels if h.predict_labels is not None else list(range(self.num_labels))
        return self._fixed(labels, h.predict_per_label, h.eval_batch_size, self.val_seed)


class PromptsDataModule(LabelsDataModule):
    """Conditions of a text-to-image policy (:class:`ctrl.policy.StableDiffusionPolicy`): its prompts, or its
    (prompt, class) pairs, numbered as the policy numbers them.

    The prompts themselves are a setting of the policy (``model.policy.prompts``: a shipped list such as
    ``ctrl:animals`` or a file of one prompt per line), which encodes them once; this module reads the
    number of conditions from the policy when the run starts and draws which condition each chain gets
    (uniformly, or by ``prior`` over the conditions), ``group_size`` chains per drawn condition.
    Arguments as :class:`LabelsDataModule`; the defaults suit Stable Diffusion (few evaluation images
    per condition).
    """

    def __init__(
        self,
        prior: list[float] | None = None,
        batch_size: int = 32,
        group_size: int = 4,
        batches_per_epoch: int = 100,
        eval_per_label: int = 2,
        eval_batch_size: int = 16,
        predict_labels: list[int] | None = None,
        predict_per_label: int = 4,
        seed: int = 0,
    ):
        super().__init__(
            None,
            prior,
            batch_size,
            batches_per_epoch,
            eval_per_label,
            eval_batch_size,
            predict_labels,
            predict_per_label,
            seed,
            group_size,
        )
