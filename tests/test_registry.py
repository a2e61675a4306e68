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


def test_trl_presets_are_plugins_with_their_methods_defaults():
    from ctrl.algorithms import DDPO, PPO, AlignProp, DirectBackprop, DRaFT

    assert registry.get_algorithm("DDPO") is DDPO and issubclass(DDPO, PPO)
    assert {registry.get_algorithm(n) for n in ("AlignProp", "DRaFT")} == {AlignProp, DRaFT}
    assert issubclass(AlignProp, DirectBackprop) and issubclass(DRaFT, DirectBackprop)
    ddpo = DDPO()
    settings = (ddpo.alpha, ddpo.clip_range, ddpo.advantage_mode, ddpo.per_condition, ddpo.advantage_clip)
    assert settings == (0.0, 1e-4, "standardize", True, 5.0) and ddpo.ratio_per_dimension
    align = AlignProp()
    assert (align.alpha, align.backprop_steps, align.random_truncation, align.unbiased_truncation) == (
        0.0,
        None,
        True,
        False,
    )
    draft = DRaFT(backprop_steps=3)  # DRaFT-K: every default can be changed
    assert (draft.alpha, draft.backprop_steps, draft.random_truncation) == (0.0, 3, False)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("DDPO", {"clip_range": 0.0001, "advantages": "standardize", "ratio_per_dimension": True}),
        ("AlignProp", {"random_truncation": True, "unbiased_truncation": False, "backprop_steps": None}),
        ("DRaFT", {"backprop_steps": 1, "random_truncation": False}),
    ],
)
def test_presets_by_short_name_in_a_config(name, expected, capsys):
    """``--model.algorithm DDPO`` resolves like the built-in names, and --print_config shows every setting."""
    from pathlib import Path

    import yaml

    from ctrl.commands import main

    config = Path(__file__).resolve().parents[1] / "configs" / "gaussian" / "direct.yaml"
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--model.algorithm", name, "--print_config"])
    assert done.value.code == 0
    algorithm = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["algorithm"]
    assert algorithm["class_path"] == f"ctrl.algorithms.{name}"
    assert {k: algorithm["init_args"][k] for k in expected} == expected
