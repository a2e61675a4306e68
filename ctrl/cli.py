"""The ``ctrl`` command: Lightning's CLI (fit, validate, test, predict, --print_config) over ctrl's modules.

Every run is a YAML config (configs/); any value can be overridden on the command line, e.g.
``ctrl fit --config configs/digits/control.yaml --model.algorithm DirectBackprop``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ctrl.registry import load_plugins


class CtrlArgumentParser(LightningArgumentParser):
    """Lightning's parser, with an unknown algorithm name answered by the list of available ones."""

    # jsonargparse words an unresolvable class name for `algorithm` in one of these two ways
    _UNKNOWN_ALGORITHM = re.compile(r"NestedArg\(key='algorithm', val='([^']*)'\)"
                                    r"|Parser key \"algorithm\":.*?Expected a dot import path string: (\S+)", re.S)

    def error(self, message: str, *args, **kwargs):
        unknown = self._UNKNOWN_ALGORITHM.search(message)
        if unknown:
            given = unknown.group(1) or unknown.group(2)
            message = (f"model.algorithm '{given}' is not an available algorithm; available: "
                       f"{', '.join(sorted(load_plugins()))}. Set `algorithm:` in the config or --model.algorithm "
                       "to one of them.")
        return super().error(message, *args, **kwargs)


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

    def instantiate_trainer(self, **kwargs):
        from ctrl.callbacks import ResumableCheckpoint

        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, ResumableCheckpoint):
                callback.place_in(trainer)
        return trainer

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes from the newest of ``last.ckpt`` and the checkpoint Lightning saves when
        SLURM preempts a job (``hpc_ckpt_N.ckpt``, which Lightning's own "last" does not consider)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = Path(self.trainer.default_root_dir)
        candidates = list(root.glob("hpc_ckpt_*.ckpt"))
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is not None:
                candidates += Path(callback.dirpath).glob("last*.ckpt")
        if candidates:
            config["ckpt_path"] = str(max(candidates, key=lambda p: p.stat().st_mtime))


def main(args: list[str] | None = None, run: bool = True) -> CtrlCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None) and return it, so tests and scripts can read
    ``cli.trainer.callback_metrics``."""
    return CtrlCLI(args=args, run=run)


def console() -> None:
    """Entry point of the ``ctrl`` console script (exit status 0 on success).

    A user's mistake (a bad path, setting or label) ends in one line naming the setting, not a
    stack trace; set CTRL_DEBUG=1 to see the trace.
    """
    from ctrl.module import RunStopped

    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RunStopped) as err:
        if os.environ.get("CTRL_DEBUG"):
            raise
        print(f"ctrl: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
