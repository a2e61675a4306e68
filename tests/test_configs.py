"""Every shipped config parses and instantiates (litgpt's rule: an untested config is a broken config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrl.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(config, tmp_path):
    cli = main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert cli.trainer.max_epochs or cli.trainer.max_steps
