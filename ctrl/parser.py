"""The parser of every ctrl command: Lightning's, answering a bad setting with one line that names it."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

import ctrl.inference_time
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
        return (
            f"{unknown.group(1)} is not a setting{_did_you_mean(unknown.group(1), list(options))}. "
            "`ctrl fit --help` lists every setting."
        )
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
        return (
            f"{setting}.{name}: {owner} has no setting '{name}'"
            f"{_did_you_mean(name, _init_settings(class_path))}. `ctrl fit --print_config` shows every setting."
        )
    if expected := re.match(r"Expected a <class '([^']+)'>\. Got value: (.*)", leaf):
        return f"{setting}: expected a value of type {expected.group(1)}, got '{expected.group(2)}'."
    return f"{setting}: {leaf}"


class CtrlArgumentParser(LightningArgumentParser):
    """Lightning's parser, answering a bad setting with one line that names it (an unknown algorithm with
    the list of available ones), instead of the usage text and jsonargparse's nested report."""

    # jsonargparse words an unresolvable class name for `algorithm` in one of these two ways
    _UNKNOWN_ALGORITHM = re.compile(
        r"NestedArg\(key='algorithm', val='([^']*)'\)"
        r"|Parser key \"algorithm\":.*?Expected a dot import path string: (\S+)",
        re.S,
    )

    def error(self, message: str, *args, **kwargs):
        if not self.exit_on_error:  # a subcommand's parser: the top-level parser words the message
            return super().error(message, *args, **kwargs)
        unknown = self._UNKNOWN_ALGORITHM.search(message)
        sampler = re.search(r"module 'ctrl\.(?:inference_time|guidance)' has no attribute '(\w+)'", message)
        if sampler:
            methods = ", ".join(n for n in sorted(ctrl.inference_time.__all__) if not n.startswith("Guided"))
            message = (
                f"inference_time: '{sampler.group(1)}' is not an inference-time method; available: {methods} "
                "(class_path: ctrl.inference_time.<name>)."
            )
        elif unknown:
            given = unknown.group(1) or unknown.group(2)
            message = (
                f"model.algorithm '{given}' is not an available algorithm; available: "
                f"{', '.join(sorted(load_plugins()))}. Set `algorithm:` in the config or --model.algorithm "
                "to one of them."
            )
        else:
            message = condense_parser_error(message, [o for a in self._actions for o in a.option_strings])
        if not os.environ.get("CTRL_DEBUG") and not os.environ.get("JSONARGPARSE_DEBUG"):
            sys.stderr.write(f"ctrl: error: {message}\n")
            sys.exit(2)
        return super().error(message, *args, **kwargs)
