"""Registry of RL algorithm plugins, by class name (the name configs use: ``algorithm: DirectBackprop``).

Plugins come from ``ctrl.algorithms`` (built in) and from installed packages that declare an entry point
in group ``ctrl.algorithms`` (``[project.entry-points."ctrl.algorithms"] MyAlgo = "pkg.mod:MyAlgo"``).
A plugin never imports the registry: the registry imports the plugins.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import ctrl.algorithms

ALGORITHMS: dict[str, type] = {}
ENTRY_POINT_GROUP = "ctrl.algorithms"


def register_algorithm(cls: type) -> type:
    """Class decorator: make ``cls`` available by its class name; a second class of the same name is refused."""
    name = cls.__name__
    other = ALGORITHMS.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"algorithm name '{name}' is taken by {other.__module__}.{other.__qualname__}; "
            f"rename {cls.__module__}.{cls.__qualname__}."
        )
    ALGORITHMS[name] = cls
    return cls


for _name in ctrl.algorithms.__all__:
    if _name != "Algorithm":
        register_algorithm(getattr(ctrl.algorithms, _name))


def load_plugins() -> dict[str, type]:
    """Register every entry point of group ``ctrl.algorithms`` (beside the built-ins); return the registry."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register_algorithm(ep.load())
    return ALGORITHMS


def available_algorithms() -> list[str]:
    return sorted(load_plugins())


def get_algorithm(name: str) -> type:
    """The plugin class called ``name``; an unknown name is answered with the available ones."""
    registry = load_plugins()
    if name not in registry:
        raise ValueError(
            f"unknown algorithm '{name}'; available: {', '.join(sorted(registry))}. "
            "Set model.algorithm to one of them."
        )
    return registry[name]
