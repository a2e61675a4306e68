"""``ctrl fit | validate | test | predict``: Lightning's CLI over ctrl's modules, as a function; and ``ctrl export``
(:class:`ExportCLI`: a checkpoint's LoRA in diffusers' format, from the config that trained it).

Every run is a YAML config (configs/); any value can be overridden on the command line, e.g.
``ctrl fit --config configs/digits/control.yaml --model.algorithm DirectBackprop``. :func:`main` runs one
(``ctrl benchmark`` runs its rows through it; tests and scripts read ``cli.trainer.callback_metrics``).
"""

from __future__ import annotations

import importlib
import os
import zipfile
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ctrl.callbacks import ResumableCheckpoint, export_atomically
from ctrl.errors import located_in
from ctrl.parser import CtrlArgumentParser
from ctrl.policy.base import DiffusionPolicy
from ctrl.registry import load_plugins


def check_checkpoint(path: str, alternative: str = "") -> None:
    """Refuse a ``--ckpt_path`` that is not there or not a checkpoint, in one line."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--ckpt_path: no checkpoint at '{path}'; give the path of a .ckpt file "
            f"(e.g. <trainer.default_root_dir>/checkpoints/last.ckpt){' ' + alternative if alternative else ''}."
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"--ckpt_path: '{path}' is not a readable checkpoint (truncated, or not written by "
            "torch.save); use an intact one, e.g. the run's checkpoints/last.ckpt."
        )


class CtrlCLI(LightningCLI):
    """LightningCLI with ctrl's plugins loaded before parsing, so configs can name them by class name."""

    def __init__(self, *args, **kwargs):
        load_plugins()
        kwargs.setdefault("parser_class", CtrlArgumentParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after fit, evaluate the fitted model on the test seeds (as ctrl test does)",
        )

    def after_fit(self) -> None:
        if self.config_init[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            fitted = dict(self.trainer.callback_metrics)  # test() starts its own; keep fit's val/... beside them
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self.trainer.callback_metrics.update(
                {k: v for k, v in fitted.items() if k not in self.trainer.callback_metrics}
            )

    def instantiate_classes(self) -> None:
        """Build every class of the config; a :class:`SettingError` is worded with its setting's path."""
        with located_in(self.config.get(str(self.config.get("subcommand")), self.config)):
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a :class:`SettingError` raised while running (a reward refusing what its function returned) is
        worded with its setting's path too."""
        with located_in(self.config.get(subcommand, self.config)):
            super()._run_subcommand(subcommand)

    def instantiate_trainer(self, **kwargs):
        self._check_devices(self._get(self.config_init, "trainer", {}))
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, ResumableCheckpoint):
                callback.place_in(trainer)
        return trainer

    @staticmethod
    def _check_devices(trainer: dict) -> None:
        """GPUs asked for that this machine does not have: one message, before Lightning's own."""
        accelerator, devices = str(trainer.get("accelerator") or "auto").lower(), trainer.get("devices")
        if accelerator not in ("gpu", "cuda"):
            return
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator} but this machine has no GPU that torch can use; set "
                "--trainer.accelerator cpu (or auto)."
            )
        if isinstance(devices, int) and devices > have:
            raise ValueError(
                f"trainer.devices={devices} but this machine has {have} GPU(s); ask for at most {have}, or -1 for all."
            )

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here, before anything else: a missing or damaged file is refused first.
        path = self.config.get(str(self.config.get("subcommand")), {}).get("ckpt_path")
        if path is not None and path not in ("last", "best", "hpc"):
            check_checkpoint(path, "or 'last'")
        super()._parse_ckpt_path()

    def _check_run_settings(self) -> None:
        """Before any work: checkpoints load as weights only, (for fit) the output folder can be written, and
        ``--ckpt_path last`` names a checkpoint (:meth:`_resolve_last`)."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True  # never unpickle code from a checkpoint
        if self.subcommand == "fit":
            root = Path(self.trainer.default_root_dir)
            try:
                root.mkdir(parents=True, exist_ok=True)
                probe = root / f".ctrl-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise ValueError(
                    f"trainer.default_root_dir '{root}' is not writable ({err.strerror or err}); set "
                    "--trainer.default_root_dir to a folder you can write to."
                ) from err
        self._resolve_last()

    def before_validate(self) -> None:
        self._check_run_settings()

    def before_test(self) -> None:
        self._check_run_settings()

    def before_predict(self) -> None:
        self._check_run_settings()

    def before_fit(self) -> None:
        self._check_run_settings()

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: the newest of ``last.ckpt`` and the checkpoint Lightning saves when SLURM preempts
        a job (``hpc_ckpt_N.ckpt``, which Lightning's own "last" does not consider). With none, ``fit`` starts
        afresh (a job that may be requeued says ``last`` from its first run); the others are refused, since
        Lightning would evaluate the untrained model after only a warning."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = Path(self.trainer.default_root_dir)
        candidates, folders = list(root.glob("hpc_ckpt_*.ckpt")), [root]
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):  # where Lightning's own "last" looks, its folder resolved
                candidates += [Path(p) for p in callback._find_last_checkpoints(self.trainer)]
                folders.append(Path(callback.dirpath) if callback.dirpath else root / "checkpoints")
        if candidates:
            config["ckpt_path"] = str(max(candidates, key=lambda p: p.stat().st_mtime))
        elif self.subcommand != "fit":
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint in {' or '.join(str(f) for f in dict.fromkeys(folders))}, so "
                f"{self.subcommand} would run the untrained model; give the path of a .ckpt file, or the "
                "trainer.default_root_dir of the run that wrote it."
            )


class ExportCLI(CtrlCLI):
    """``ctrl export --config FIT.yaml --ckpt_path RUN.ckpt [--out DIR]``: the parser of ``ctrl fit`` (the config
    that trained the checkpoint, with any overrides) plus ``--ckpt_path`` and ``--out``. It builds only the config's
    policy (no reward, data or trainer: their weights need not be on this machine), loads the checkpoint's weights
    into it and writes its diffusers export (:meth:`export`)."""

    def __init__(self, args: list[str] | None = None):
        description = "Write a checkpoint's LoRA in diffusers' format (pipe.load_lora_weights), from its fit config."
        super().__init__(args=args, run=False, parser_kwargs={"prog": "ctrl export", "description": description})

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="the checkpoint to export (a run's checkpoints/*.ckpt)"
        )
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="the folder to write (default: beside the checkpoint, <its name>_lora, e.g. checkpoints/last_lora)",
        )

    def _parse_ckpt_path(self) -> None:
        path = self.config.get("ckpt_path")
        if path is None:
            raise ValueError("--ckpt_path: give the checkpoint to export, e.g. runs/<run>/checkpoints/last.ckpt.")
        check_checkpoint(path)

    def instantiate_classes(self) -> None:
        """Build the config's policy alone, as :attr:`policy`; a policy without an export is refused first."""
        spec = self.config.get("model.init_args.policy")
        if spec is None:
            raise ValueError(
                f"model: {self.config.get('model.class_path')} has no policy to export; give the config of a "
                "ctrl.module.ControlModule run (e.g. configs/sd15/*.yaml)."
            )
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(DiffusionPolicy, "policy")
        config = parser.parse_object({"policy": spec.as_dict()})
        if not _exports(config.policy.class_path):
            raise ValueError(
                f"model.policy: {config.policy.class_path} has no diffusers export; ctrl export writes the LoRA "
                "(and class embedding) of ctrl.policy.StableDiffusionPolicy and StableDiffusion3Policy."
            )
        with located_in(self.config):
            self.policy = parser.instantiate_classes(config).policy

    def export(self) -> tuple[Path, list[str]]:
        """Load the checkpoint's policy weights and write the export: ``(folder, names of the files written)``."""
        path = self.config.ckpt_path
        state = torch.load(path, weights_only=True, map_location="cpu").get("state_dict", {})
        state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        own = self.policy.state_dict()
        trained = {id(p) for group in self.policy.param_groups() for p in group["params"]}
        missing = sorted(n for n, p in self.policy.named_parameters() if id(p) in trained and n not in state)
        other = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
        if missing or other:
            example = f"lacks '{missing[0]}'" if missing else f"has '{other[0]}'"
            raise ValueError(
                f"--ckpt_path: '{path}' does not hold this config's policy weights ({example}, among "
                f"{len(missing) + len(other)}): it was written with another model.policy config; export it with the "
                "config that wrote it."
            )
        self.policy.load_state_dict(state, strict=False)  # checkpoints hold the trainable weights only
        out = Path(self.config.out or Path(path).with_name(f"{Path(path).stem}_lora"))
        try:
            return out, export_atomically(self.policy, out)
        except OSError as err:
            raise ValueError(f"--out: cannot write '{out}' ({err.strerror or err}); give a writable folder.") from None


def _exports(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(getattr(importlib.import_module(module), name), "export")
    except (ImportError, AttributeError, ValueError):
        return False


def export(args: list[str] | None = None) -> Path:
    """``ctrl export``: write the LoRA of ``--ckpt_path`` for diffusers; returns the folder written."""
    out, written = ExportCLI(args).export()
    print(f"wrote {', '.join(written)} to {out} (diffusers: pipe.load_lora_weights)")
    return out


def main(args: list[str] | None = None, run: bool = True) -> CtrlCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None) and return it, so tests and scripts can read
    ``cli.trainer.callback_metrics``."""
    return CtrlCLI(args=args, run=run)
