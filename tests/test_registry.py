"""The plugin registry: built-ins, entry points, duplicate names, unknown names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctrl import registry
from ctrl.algorithms.base import Algorithm


def test_builtin_plugins_are_registered():
    assert "DirectBackprop" in registry.available_algorithms()
    assert registry.get_algorithm("DirectBackprop").__module__ == "ctrl.algorithms.direct"


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown algorithm 'Nope'; available: .*DirectBackprop"):
        registry.get_algorithm("Nope")


def test_duplicate_name_is_refused():
    class DirectBackprop(Algorithm):  # same class name, another module
        def loss(self, trajectory, policy, reward):
            return {}

    with pytest.raises(ValueError, match="algorithm name 'DirectBackprop' is taken"):
        registry.register_algorithm(DirectBackprop)


def test_entry_point_plugins_are_loaded(monkeypatch):
    class MyPlugin(Algorithm):
        def loss(self, trajectory, policy, reward):
            return {}

    fake = SimpleNamespace(load=lambda: MyPlugin)
    monkeypatch.setattr(registry, "entry_points", lambda group: [fake] if group == "ctrl.algorithms" else [])
    monkeypatch.setattr(registry, "ALGORITHMS", dict(registry.ALGORITHMS))
    assert registry.get_algorithm("MyPlugin") is MyPlugin
