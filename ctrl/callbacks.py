"""Callbacks: resumable checkpoints, `ctrl predict` samples as a PNG grid, LoRA export for diffusers (during and
at the end of a run)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from ctrl.errors import SettingError
from ctrl.images import grid_image
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
        if not trainer.is_global_zero or not predictions:
            return
        samples = torch.cat([p["samples"] for p in predictions])
        labels = torch.cat([p["labels"] for p in predictions])
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
                "ctrl.policy.StableDiffusionPolicy or remove the callback.",
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
