"""Every shipped config parses and instantiates (litgpt's rule: an untested config is a broken config).

The sd15 configs name Stable Diffusion 1.5 and the aesthetic weights, which cannot be fetched here:
their instantiation swaps in the tiny local components (conftest), everything else as shipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrl.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


def _tiny_components(config: Path, request) -> list[str]:
    if config.parent.name != "sd15":
        return []
    swaps = ["--model.policy.pretrained", request.getfixturevalue("tiny_sd"), "--model.policy.dtype", "float32",
             "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    reward = config.read_text()
    if "ClassifierLogProb" in reward:
        return swaps + ["--model.reward.path", request.getfixturevalue("tiny_rgb_classifier")]
    clip, mlp = request.getfixturevalue("tiny_aesthetic")
    return swaps + ["--model.reward.clip_model", clip, "--model.reward.mlp_path", mlp]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(config, tmp_path, request):
    cli = main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path),
                *_tiny_components(config, request)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert cli.trainer.max_epochs or cli.trainer.max_steps
