"""The ``ctrl`` console command: ``ctrl benchmark ...`` (:mod:`ctrl.benchmark`) or a Lightning subcommand
(``fit``, ``validate``, ``test``, ``predict``, ``--print_config``; :mod:`ctrl.commands`).

A user's mistake (a bad path, setting or label) ends in one line naming the setting, not a stack trace;
set CTRL_DEBUG=1 to see the trace.
"""

from __future__ import annotations

import os
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ctrl import benchmark, commands
from ctrl.module import RunStopped
from ctrl.parser import condense_parser_error

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    RunStopped,
    MisconfigurationException,
)


def console(args: list[str] | None = None) -> None:
    """Entry point of the ``ctrl`` console script on ``args`` (``sys.argv[1:]`` when None)."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["benchmark"]:
            benchmark.main(argv[1:])
        else:
            commands.main(args)  # None: Lightning reads sys.argv itself (and warns when given both)
    except USER_ERRORS as err:
        if os.environ.get("CTRL_DEBUG"):
            raise
        # Lightning's own refusals (devices, accelerator, strategy) concern the trainer's settings
        where = "trainer settings: " if isinstance(err, MisconfigurationException) else ""
        print(f"ctrl: error: {where}{condense_parser_error(str(err))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
