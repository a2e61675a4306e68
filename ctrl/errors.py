"""Errors that name the setting a user wrote.

A class built from a config knows its own settings but not where it sits in the config (``model.policy``,
``model.reward.rewards[1]``, a benchmark's row): it raises :class:`SettingError` with the setting's name
relative to itself, and whoever parsed the config (the CLI, the benchmark) calls :meth:`SettingError.locate`
to word it with the full path.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_UNSET = object()


class SettingError(ValueError):
    """A bad value of setting ``key`` of ``owner`` (a class, the instance being built, or a name).

    ``str(err)`` is ``"<path>.<key>: <problem>"`` once located, ``"<Owner>.<key>: <problem>"`` before.
    ``value`` (optional) tells two instances of the same class apart when locating.
    """

    def __init__(self, owner: Any, key: str, problem: str, value: Any = _UNSET):
        self.owner = owner if isinstance(owner, (type, str)) else type(owner)
        self.key, self.problem, self.value = key, problem, value
        self.path: str | None = None
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or getattr(self.owner, "__name__", self.owner)
        return f"{where}.{self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"

    def locate(self, config: Any, prefix: str = "") -> SettingError:
        """Find ``owner`` in a parsed config (nested dicts / namespaces with ``class_path``) and set the path."""
        if isinstance(self.owner, str):
            return self
        found = [
            (path, init)
            for path, class_path, init in _class_entries(_plain(config), prefix)
            if _resolves_to(class_path, self.owner)
        ]
        if self.value is not _UNSET and len(found) > 1:
            found = [f for f in found if f[1].get(self.key, _UNSET) == self.value] or found
        if found:
            self.path = found[0][0]
            self.args = (str(self),)
        return self


def setting_error_in(err: BaseException | None) -> SettingError | None:
    """The :class:`SettingError` that ``err`` is, or was raised from, if any: jsonargparse re-raises a
    constructor's error as "Does not validate against any of the Union subtypes" from it when the class sits
    under an Optional (``model`` under a subcommand, a benchmark's list of methods)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SettingError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


@contextmanager
def located_in(config: Any) -> Iterator[None]:
    """A :class:`SettingError` raised inside (while ``config``'s classes are built) is worded with its path."""
    try:
        yield
    except ValueError as err:
        found = setting_error_in(err)
        if found is None:
            raise
        raise found.locate(config) from None


@contextmanager
def setting(owner: Any, key: str, value: Any = _UNSET) -> Iterator[None]:
    """Errors raised inside are about ``owner``'s setting ``key``: a ValueError or OSError (a missing or
    unreadable file) becomes a :class:`SettingError` with the same message, so that loaders need not know
    where their argument came from. ``with setting(self, "path", path): net = load_classifier(path)``."""
    try:
        yield
    except SettingError:
        raise
    except (ValueError, OSError) as err:
        raise SettingError(owner, key, str(err), value) from None


def _plain(config: Any) -> Any:
    if hasattr(config, "as_dict"):
        return config.as_dict()
    return config


def _class_entries(node: Any, path: str):
    """``(path, class_path, init_args)`` of every class entry under ``node``, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            init = node.get("init_args") or {}
            yield path, node["class_path"], _plain(init)
            yield from _class_entries(_plain(init), path)
            return
        for key, value in node.items():
            yield from _class_entries(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _class_entries(value, f"{path}[{i}]")


def _resolves_to(class_path: str, owner: type) -> bool:
    if class_path in (owner.__name__, f"{owner.__module__}.{owner.__qualname__}"):
        return True
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) is owner
    except (ImportError, AttributeError, ValueError):
        return False


def non_negative(owner: Any, key: str, value: float) -> float:
    """``value`` when it is >= 0; else the :class:`SettingError` of ``owner``'s setting ``key``."""
    if value < 0:
        raise SettingError(owner, key, f"must be >= 0, got {value}.")
    return value


_NOTICED: set[str] = set()


def notice(message: str) -> None:
    """One line on stderr, once per process: something the user should change, that still works."""
    if message not in _NOTICED:
        _NOTICED.add(message)
        print(f"ctrl: notice: {message}", file=sys.stderr, flush=True)


def renamed_setting(owner: str, old: str, old_value: Any, new: str, new_value: Any, default: Any = None) -> Any:
    """The value of setting ``new`` of ``owner``, also accepted under its old name ``old`` for one release
    (with a notice naming the new key); both given is refused. None (the old name) and ``default`` (the new
    one) stand for "not given"."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise SettingError(owner, old, f"is the old name of {new}; give only {new}.")
    name = getattr(owner, "__name__", owner)
    notice(f"{old} is renamed {new} ({name}); write {new}: the old name works until ctrl 0.3.")
    return old_value


def trained_at_least_one_step(trainer, written: str) -> None:
    """Refuse to write ``written`` (an exported model) from a fit that ended without an optimizer step: Lightning
    ends such a fit quietly ("No training batches"), and the untrained weights would be taken for trained ones."""
    if trainer.global_step == 0:
        raise ValueError(
            f"the fit ended without an optimizer step, so nothing was written to {written}: the training data gave "
            "no batch (fewer images than data.batch_size per process) or trainer.max_steps / max_epochs is 0; give "
            "more images, a smaller data.batch_size, or more steps."
        )
