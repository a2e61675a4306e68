"""Callbacks: resumable checkpoints, `ctrl predict` samples as a PNG grid, LoRA export for diffusers (during and
at the end of a run), captioned sample grids in any logger."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor

from ctrl.errors import SettingError, notice
from ctrl.images import captioned_grid, grid_count, grid_image, to_cells
from ctrl.policy.adapters import LORA_WEIGHTS

# Lightning warns at every step-triggered save under manual optimisation that the checkpoint holds the
# state after the optimizer step: for resuming, that is exactly the state wanted.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, set up so that ``ctrl fit ... --ckpt_path last`` resumes a run.

    ``last.ckpt`` is written every ``every_n_train_steps`` optimizer steps and at the end of each
    epoch into ``<trainer.default_root_dir>/checkpoints`` unless ``dirpath`` says otherwise: one
    folder for every attempt of a run (Lightning's default is a new ``version_N`` folder per attempt,
    where ``last`` would never be found). Each file is written under a temporary name in the same
    folder and renamed over the old one, so a kill during a save leaves the previous ``last.ckpt``
    whole. Only ``last`` is kept unless ``save_top_k`` (with a ``monitor``) asks for more.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 20,
        save_last: bool = True,
        save_top_k: int = 0,
        **kwargs,
    ):
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning saves by steps or by epochs, not both: the end of an epoch (the end of a run) is
        # saved here even when it does not fall on a multiple of every_n_train_steps.
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        # once more after the final validation, so that the last checkpoint holds its metrics
        if not trainer.fast_dev_run and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # Lightning's own write goes through a temporary file that is moved into place, but the
        # temporary file lies in /tmp: across file systems the move is a copy, and a kill during
        # the copy leaves a truncated file. A rename within one folder is atomic.
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("ResumableCheckpoint")
        self._last_checkpoint_saved = filepath

    def place_in(self, trainer) -> None:
        """Fix ``dirpath`` before Lightning looks for ``last`` (that happens before ``setup``)."""
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.place_in(trainer)
        super().setup(trainer, pl_module, stage)


class PredictionGrid(BasePredictionWriter):
    """Writes the samples of ``ctrl predict`` as one PNG: a row per requested label.

    Args:
        path: the PNG file to write (its folder is created).
        scale: pixel upscaling of the PNG (nearest neighbour), so small images stay visible.
    """

    def __init__(self, path: str = "samples.png", scale: int = 4):
        super().__init__(write_interval="epoch")
        self.path, self.scale = Path(path), scale

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        samples, labels = _all_predictions(trainer, predictions, batch_indices)
        if not trainer.is_global_zero or not len(samples):
            return
        order = torch.argsort(labels, stable=True)
        rows = len(torch.unique(labels))
        image = grid_image(samples[order], rows, self.scale)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            image.save(self.path)
        except OSError as err:
            raise SettingError(
                self,
                "path",
                f"cannot write '{self.path}' ({err.strerror}); choose a writable path with "
                "--trainer.callbacks.path or in the config.",
            ) from None
        pl_module.print(
            f"wrote {len(samples)} samples ({rows} labels, control scale {pl_module.control_scale}) to {self.path}"
        )


def _all_predictions(trainer, predictions: list[dict], batch_indices: list) -> tuple[Tensor, Tensor]:
    """Every process's predicted ``samples`` (N, C, H, W) and ``labels`` (N,), in the dataset's order. Under DDP each
    process predicted its own share (Lightning's predict sampler deals the samples out without repeats): all shares
    are gathered, so one process's grid is the whole set. ``batch_indices`` (per dataloader, per batch: the dataset
    indices Lightning recorded) restores the order; without them the shares stay in rank order."""
    samples = [p["samples"] for p in predictions]
    labels = [p["labels"] for p in predictions]
    indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
    share = (
        torch.cat(samples) if samples else torch.empty(0),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        torch.tensor(indices, dtype=torch.long),
    )
    shares = [share]
    if trainer.world_size > 1:
        shares = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, share)
    shares = [s for s in shares if len(s[0])]
    if not shares:
        return share[0], share[1]
    samples, labels, indices = (torch.cat(part) for part in zip(*shares))
    if len(indices) == len(samples):
        order = torch.argsort(indices)
        samples, labels = samples[order], labels[order]
    return samples, labels


def export_atomically(policy, directory: str | Path) -> list[str]:
    """``policy.export(directory)`` such that a kill at any moment leaves no half-written file there: the export is
    written into a temporary folder beside ``directory``, then renamed into place (the whole folder when it is new,
    else file by file, the LoRA last). Returns the names of the files written."""
    directory = Path(directory)
    partial = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # what a killed export left
    policy.export(partial)
    names = sorted((p.name for p in partial.iterdir()), key=lambda name: (name == LORA_WEIGHTS, name))
    if not directory.exists():
        os.replace(partial, directory)
        return names
    for name in names:
        os.replace(partial / name, directory / name)
    partial.rmdir()
    return names


class ExportLora(Callback):
    """Writes the policy's trained adapter where diffusers loads it,
    ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(directory)`` (and the class embedding, if any,
    beside it; :meth:`ctrl.policy.StableDiffusionPolicy.export`): at the end of ``ctrl fit`` into ``directory``, and
    with ``every_n_steps`` also during it, into ``directory/step_<optimizer step>``. Each export is written under a
    temporary name and renamed (:func:`export_atomically`), so a killed run leaves no half-written LoRA.

    Args:
        directory: the folder to write (created; files in it are replaced); default
            ``<trainer.default_root_dir>/lora``.
        every_n_steps: also export every this many optimizer steps (at the end of the first rollout at or past each
            multiple; PPO takes several steps per rollout); None: only at the end.
    """

    def __init__(self, directory: str | None = None, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise SettingError(self, "every_n_steps", f"must be >= 1 (or None: only at the end), got {every_n_steps}.")
        self.directory = Path(directory) if directory else None
        self.every_n_steps = every_n_steps
        self._exported_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.directory is None:
            self.directory = Path(trainer.default_root_dir) / "lora"
        if not hasattr(pl_module.policy, "export"):
            raise SettingError(
                self,
                "",
                f"the policy {type(pl_module.policy).__name__} has no diffusers export; use it with "
                "ctrl.policy.StableDiffusionPolicy or StableDiffusion3Policy, or remove the callback.",
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._exported_step = trainer.global_step  # a resumed run exports from where it is, not again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every and step // every > self._exported_step // every:
            self._exported_step = step
            self._export(trainer, pl_module, self.directory / f"step_{step}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, self.directory)

    def _export(self, trainer, pl_module, directory: Path) -> None:
        if not trainer.is_global_zero:
            return
        try:
            written = export_atomically(pl_module.policy, directory)
        except OSError as err:
            raise SettingError(
                self,
                "directory",
                f"cannot write '{directory}' ({err.strerror}); choose a writable folder (in trainer.callbacks).",
            ) from None
        pl_module.print(f"wrote {', '.join(written)} to {directory} (diffusers: pipe.load_lora_weights)")


def spread(labels: Tensor, limit: int) -> Tensor:
    """Indices of the samples of conditions ``labels`` ``[N]`` that a grid of at most ``limit`` shows: one of each
    condition in turn (in the order they come), so that few cells still show many conditions; as many as fill a grid
    exactly (:func:`ctrl.images.grid_count`)."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels)  # where each sample's condition starts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - first  # the how-manieth sample of its condition
    turns = torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)
    return turns[: grid_count(len(labels), limit)]


def log_grid(trainer, tag: str, images: Tensor, names: list[str], labels: Tensor, rewards: Tensor, size: int) -> None:
    """Log samples ``images`` ``[N, C, H, W]`` in [-1, 1] of conditions ``labels`` ``[N]`` (named ``names``) with
    their ``rewards`` ``[N]`` as one captioned grid under ``tag`` to each of the trainer's loggers, as
    :class:`LogSamples` describes."""
    # Lightning logs scalars at its count of rollouts, not at global_step (PPO takes several optimizer steps per
    # rollout): a grid goes beside the scalars of its rollout or evaluation, its files are named by optimizer step.
    step, axis = trainer.global_step, trainer.fit_loop.epoch_loop._batches_that_stepped
    captions = [f"{name}\nreward {r:.4g}" for name, r in zip(names, rewards.tolist())]
    grid, layout = captioned_grid(images, captions, size)
    cells = [
        {"condition": name, "label": int(y), "reward": float(r)}
        for name, y, r in zip(names, labels.tolist(), rewards.tolist())
    ]
    record = {"tag": tag, "step": step, "logger_step": axis, **layout, "samples": cells}
    artifact = f"images/{tag}/step_{step}"
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(grid), axis, dataformats="HWC")
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / artifact
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path.with_suffix(".png"))
            path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        elif isinstance(logger, WandbLogger):  # a gallery: one image per sample, its caption beside it
            logger.log_image(key=tag, images=to_cells(images, size), step=axis, caption=captions)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, grid, f"{artifact}.png")
            logger.experiment.log_dict(logger.run_id, record, f"{artifact}.json")
        else:
            notice(
                f"LogSamples logs no images to {type(logger).__name__} (TensorBoard, CSV, W&B and MLflow loggers "
                "get them); add one of those loggers to see the samples."
            )


class LogSamples(Callback):
    """Grids of samples, each captioned with its condition (the policy's ``condition_name``: the label, or the prompt
    and class) and its reward, in every logger the trainer has: the policy's evaluation samples at the end of each
    validation and test (tags ``val/samples``, ``test/samples``) and, with ``every_n_steps``, the training rollout
    (``train/samples``). :class:`ctrl.module.ControlModule` adds one with these defaults when the trainer has none.

    The captions are drawn into the image (:func:`ctrl.images.captioned_grid`), so they show in every logger. Where the
    grids go: TensorBoard ``add_image``; CSVLogger ``<log_dir>/images/<tag>/step_<N>.png`` with ``step_<N>.json``
    beside (the grid's layout and each cell's condition, label and reward, row-major); W&B ``log_image``, one image
    per sample with its caption; MLflow the PNG and JSON as run artifacts ``images/<tag>/step_<N>.*``. N is the
    optimizer step (``global_step``); on a logger's step axis a grid sits where Lightning put the scalars of the
    same rollout or evaluation (its count of rollouts before it; the JSON's ``logger_step``). The grid has
    no empty cell: it shows as many samples as fill it exactly, which may be a few less than ``max_images`` or than
    there are (:func:`ctrl.images.grid_count`). Samples that are not images (the Gaussian policy's) are not logged.

    Args:
        every_n_steps: also log the training rollout every this many optimizer steps: the rollout of the first
            training step at or past each multiple (PPO takes several steps per rollout), as that step sampled it
            (no sampling pass of its own: at most ``max_images`` of its samples are decoded and scored again; under
            DDP, rank 0's chains); None: evaluation samples only.
        max_images: at most this many samples per grid, one of each condition in turn.
        cell_size: the longer side of a grid cell in pixels, at most: a smaller sample is enlarged by a whole factor
            (nearest neighbour), a larger one shrunk.
    """

    def __init__(self, every_n_steps: int | None = None, max_images: int = 16, cell_size: int = 256):
        if every_n_steps is not None and every_n_steps < 1:
            raise SettingError(
                self, "every_n_steps", f"must be >= 1 (or None: evaluation samples only), got {every_n_steps}."
            )
        if max_images < 1:
            raise SettingError(self, "max_images", f"must be >= 1, got {max_images}.")
        if cell_size < 64:
            raise SettingError(self, "cell_size", f"must be >= 64 pixels (room for a caption), got {cell_size}.")
        self.every_n_steps, self.max_images, self.cell_size = every_n_steps, max_images, cell_size
        self._logged_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._logged_step = trainer.global_step  # a resumed run logs from where it is

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if not every or step // every <= self._logged_step // every:
            return
        self._logged_step = step
        if not trainer.is_global_zero or not trainer.loggers or pl_module.rollout_samples is None:
            return
        labels, x0 = pl_module.rollout_samples
        shown = spread(labels, self.max_images).to(labels.device)
        with torch.no_grad():
            images = pl_module.policy.decode(x0[shown])
            rewards = pl_module.policy.score_images(pl_module.reward, images, labels[shown])
        self._log(trainer, pl_module, "train/samples", images, labels[shown], rewards)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._log_evaluation(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._log_evaluation(trainer, pl_module)

    def _log_evaluation(self, trainer, pl_module) -> None:
        samples, pl_module.eval_samples = pl_module.eval_samples, None  # taken: not held through training
        if samples is None or trainer.sanity_checking or not trainer.is_global_zero or not trainer.loggers:
            return
        stage, images, labels, rewards = samples
        shown = spread(labels, self.max_images)
        self._log(trainer, pl_module, f"{stage}/samples", images[shown], labels[shown], rewards[shown])

    def _log(self, trainer, pl_module, tag: str, images: Tensor, labels: Tensor, rewards: Tensor) -> None:
        if images.ndim != 4:
            return
        names = [pl_module.policy.condition_name(int(y)) for y in labels.tolist()]
        log_grid(trainer, tag, images.float().cpu(), names, labels.cpu(), rewards.float().cpu(), self.cell_size)
