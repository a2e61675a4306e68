"""The ``ctrl`` command: Lightning's CLI (fit, validate, test, predict, --print_config) over ctrl's modules.

Every run is a YAML config (configs/); any value can be overridden on the command line, e.g.
``ctrl fit --config configs/digits/control.yaml --model.algorithm DirectBackprop``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import zipfile
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ctrl.registry import load_plugins


def _init_settings(class_path: str | None) -> list[str]:
    """The constructor arguments of ``class_path`` (for "did you mean"); empty when it cannot be imported."""
    if not class_path:
        return []
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _did_you_mean(given: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(given, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_REPORT_FRAMING = ("Does not validate", "Subtypes:", "Errors:", "Given value")


def condense_parser_error(message: str, options: list[str] = ()) -> str:
    """jsonargparse's nested report of a bad setting -> one sentence naming the setting and the fix.

    The report nests ``Parser key "k":`` and ``Problem with given class_path 'C':`` lines down to the
    actual problem; the first branch is the one about the given class (the others try ``None``).
    """
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown:
        return (f"{unknown.group(1)} is not a setting{_did_you_mean(unknown.group(1), list(options))}. "
                "`ctrl fit --help` lists every setting.")
    keys, class_path, leaf = [], None, None
    for line in message.splitlines():
        text = line.strip()
        if text.startswith("- Expected a <class 'NoneType'>"):
            break
        if key := re.match(r'(?:error: )?Parser key "([^"]+)":', text):
            keys.append(key.group(1))
        elif cls := re.match(r"(?:- )?Problem with given class_path '([^']+)':", text):
            class_path = cls.group(1)
        elif text and leaf is None and not text.startswith(_REPORT_FRAMING):
            leaf = text.removeprefix("- ")
    if leaf is None:
        return message
    if not keys:  # an error raised by a constructor: its own message already names the setting
        return leaf
    setting = ".".join(keys)
    if option := re.match(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)", leaf):
        name = option.group(1)
        owner = class_path.rpartition(".")[2] if class_path else setting
        return (f"{setting}.{name}: {owner} has no setting '{name}'"
                f"{_did_you_mean(name, _init_settings(class_path))}. `ctrl fit --print_config` shows every setting.")
    if expected := re.match(r"Expected a <class '([^']+)'>\. Got value: (.*)", leaf):
        return f"{setting}: expected a value of type {expected.group(1)}, got '{expected.group(2)}'."
    return f"{setting}: {leaf}"


class CtrlArgumentParser(LightningArgumentParser):
    """Lightning's parser, answering a bad setting with one line that names it (an unknown algorithm with
    the list of available ones), instead of the usage text and jsonargparse's nested report."""

    # jsonargparse words an unresolvable class name for `algorithm` in one of these two ways
    _UNKNOWN_ALGORITHM = re.compile(r"NestedArg\(key='algorithm', val='([^']*)'\)"
                                    r"|Parser key \"algorithm\":.*?Expected a dot import path string: (\S+)", re.S)

    def error(self, message: str, *args, **kwargs):
        if not self.exit_on_error:  # a subcommand's parser: the top-level parser words the message
            return super().error(message, *args, **kwargs)
        unknown = self._UNKNOWN_ALGORITHM.search(message)
        sampler = re.search(r"module 'ctrl\.guidance' has no attribute '(\w+)'", message)
        if sampler:
            import ctrl.guidance

            message = (f"guidance: '{sampler.group(1)}' is not an inference-time method; available: "
                       f"{', '.join(n for n in sorted(ctrl.guidance.__all__) if not n.startswith('Guided'))} "
                       "(class_path: ctrl.guidance.<name>).")
        elif unknown:
            given = unknown.group(1) or unknown.group(2)
            message = (f"model.algorithm '{given}' is not an available algorithm; available: "
                       f"{', '.join(sorted(load_plugins()))}. Set `algorithm:` in the config or --model.algorithm "
                       "to one of them.")
        else:
            message = condense_parser_error(message, [o for a in self._actions for o in a.option_strings])
        if not os.environ.get("CTRL_DEBUG") and not os.environ.get("JSONARGPARSE_DEBUG"):
            sys.stderr.write(f"ctrl: error: {message}\n")
            sys.exit(2)
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

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, evaluate the fitted model on the test seeds (as ctrl test does)")

    def after_fit(self) -> None:
        if self.config_init[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            fitted = dict(self.trainer.callback_metrics)  # test() starts its own; keep fit's val/... beside them
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self.trainer.callback_metrics.update({k: v for k, v in fitted.items() if k not in
                                                  self.trainer.callback_metrics})

    def instantiate_trainer(self, **kwargs):
        from ctrl.callbacks import ResumableCheckpoint

        self._check_devices(self._get(self.config_init, "trainer", {}))
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, ResumableCheckpoint):
                callback.place_in(trainer)
        return trainer

    @staticmethod
    def _check_devices(trainer: dict) -> None:
        """GPUs asked for that this machine does not have: one message, before Lightning's own."""
        import torch

        accelerator, devices = str(trainer.get("accelerator") or "auto").lower(), trainer.get("devices")
        if accelerator not in ("gpu", "cuda"):
            return
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ValueError(f"trainer.accelerator={accelerator} but this machine has no GPU that torch can use; set "
                             "--trainer.accelerator cpu (or auto).")
        if isinstance(devices, int) and devices > have:
            raise ValueError(f"trainer.devices={devices} but this machine has {have} GPU(s); ask for at most {have}, "
                             "or -1 for all.")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint here, before anything else: a missing or damaged file is refused first.
        path = self.config.get(str(self.config.get("subcommand")), {}).get("ckpt_path")
        if path is not None and path not in ("last", "best", "hpc"):
            if not Path(path).is_file():
                raise FileNotFoundError(f"--ckpt_path: no checkpoint at '{path}'; give the path of a .ckpt file "
                                        "(e.g. <trainer.default_root_dir>/checkpoints/last.ckpt) or 'last'.")
            if not zipfile.is_zipfile(path):
                raise ValueError(f"--ckpt_path: '{path}' is not a readable checkpoint (truncated, or not written by "
                                 "torch.save); use an intact one, e.g. the run's checkpoints/last.ckpt.")
        super()._parse_ckpt_path()

    def _check_run_settings(self) -> None:
        """Before any work: checkpoints load as weights only, and (for fit) the output folder can be written."""
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
                raise ValueError(f"trainer.default_root_dir '{root}' is not writable ({err.strerror or err}); set "
                                 "--trainer.default_root_dir to a folder you can write to.") from err

    def before_validate(self) -> None:
        self._check_run_settings()

    def before_test(self) -> None:
        self._check_run_settings()

    def before_predict(self) -> None:
        self._check_run_settings()

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes from the newest of ``last.ckpt`` and the checkpoint Lightning saves when
        SLURM preempts a job (``hpc_ckpt_N.ckpt``, which Lightning's own "last" does not consider)."""
        self._check_run_settings()
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
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ctrl.module import RunStopped

    try:
        if sys.argv[1:2] == ["benchmark"]:
            from ctrl.benchmark import main as benchmark

            benchmark(sys.argv[2:])
        else:
            main()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RunStopped,
            MisconfigurationException) as err:
        if os.environ.get("CTRL_DEBUG"):
            raise
        # Lightning's own refusals (devices, accelerator, strategy) concern the trainer's settings
        where = "trainer settings: " if isinstance(err, MisconfigurationException) else ""
        print(f"ctrl: error: {where}{condense_parser_error(str(err))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
