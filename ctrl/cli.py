"""The ``ctrl`` console command: a Lightning subcommand (``fit``, ``validate``, ``test``, ``predict``,
``--print_config``; :mod:`ctrl.commands`), ``ctrl benchmark ...`` (:mod:`ctrl.benchmark`), ``ctrl configs [DIR]``
(the shipped configs into ``DIR``, default ``./configs``; :func:`ctrl.assets.copy_configs`) or ``ctrl export ...``
(a checkpoint's LoRA for diffusers; :func:`ctrl.commands.export`).

A user's mistake (a bad path, setting or label) ends in one line naming the setting, not a stack trace;
set CTRL_DEBUG=1 to see the trace.
"""

from __future__ import annotations

import os
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ctrl import __version__, benchmark, commands
from ctrl.assets import copy_configs
from ctrl.module import RunStopped
from ctrl.parser import CtrlArgumentParser, condense_parser_error

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    RunStopped,
    MisconfigurationException,
)


DESCRIPTION = "ctrl: add control to pretrained diffusion models with reinforcement learning."


def configs_parser() -> CtrlArgumentParser:
    """The parser of ``ctrl configs [DIR]``."""
    parser = CtrlArgumentParser(prog="ctrl configs", description=HELP["configs"])
    parser.add_argument("dir", nargs="?", default="configs", help="the folder to copy them into")
    return parser


def configs(args: list[str]) -> None:
    """``ctrl configs [DIR]``: copy the shipped configs into DIR."""
    folder = configs_parser().parse_args(args).dir
    written = copy_configs(folder)
    print(f"copied {len(written)} files into {folder}/")


#: ctrl's own subcommands beside Lightning's: :func:`console` runs them before Lightning's parser sees the
#: command line, which lists them (with their parsers, for ``--help``) in ``ctrl --help``
HELP = {
    "benchmark": "Every method of a task side by side: a markdown table, a CSV and a figure.",
    "configs": "Copy the shipped configs (YAML files, the SLURM script) into a folder, default ./configs.",
    "export": "Write a checkpoint's LoRA in diffusers' format: --config FIT.yaml --ckpt_path RUN.ckpt [--out DIR].",
}


def export_parser() -> CtrlArgumentParser:
    """What ``ctrl --help`` lists for ``ctrl export``; the command parses with :class:`ctrl.commands.ExportCLI`
    (``ctrl export --help``: every setting of the fit config beside --ckpt_path and --out)."""
    return CtrlArgumentParser(prog="ctrl export", description=HELP["export"])


PARSERS = {"benchmark": benchmark.build_parser, "configs": configs_parser, "export": export_parser}
RUNNERS = {"benchmark": benchmark.main, "configs": configs, "export": commands.export}


class ConsoleCLI(commands.CtrlCLI):
    """The ``ctrl`` command: titled for ctrl, with ``--version``, and ctrl's own subcommands listed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"prog": "ctrl", "description": DESCRIPTION, "version": __version__})
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            for name, build in PARSERS.items():
                self.parser._subcommands_action.add_subcommand(name, build(), help=HELP[name])


def console(args: list[str] | None = None) -> None:
    """Entry point of the ``ctrl`` console script on ``args`` (``sys.argv[1:]`` when None)."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] and argv[0] in RUNNERS:
            RUNNERS[argv[0]](argv[1:])
        else:
            ConsoleCLI(args=args)  # None: Lightning reads sys.argv itself (and warns when given both)
    except USER_ERRORS as err:
        if os.environ.get("CTRL_DEBUG"):
            raise
        # Lightning's own refusals (devices, accelerator, strategy) concern the trainer's settings
        where = "trainer settings: " if isinstance(err, MisconfigurationException) else ""
        print(f"ctrl: error: {where}{condense_parser_error(str(err))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
