"""Settings by one name: renamed keys still load with a one-line notice naming the new key; errors of a nested
class are worded with the path the config gave it; a plugin cannot write onto the context the module gives it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctrl import errors
from ctrl.algorithms import PPO, DirectBackprop
from ctrl.algorithms.base import AlgorithmContext
from ctrl.commands import main
from ctrl.errors import SettingError, renamed_setting
from ctrl.inference_time import SMC
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian
from ctrl.rewards import ClassifierLogProb, GaussianLogLikelihood

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    monkeypatch.setattr(errors, "_NOTICED", set())  # a notice is said once per process


def _instantiate(config: str, tmp_path, *overrides: str):
    """``ctrl fit --config configs/<config>.yaml <overrides>``, built but not run."""
    root = ["--trainer.default_root_dir", str(tmp_path)]
    return main(["--config", str(CONFIGS / f"{config}.yaml"), *overrides, *root], run=False)


def _notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ctrl: notice:")]


def test_renamed_control_scale_key_loads_with_one_notice(tmp_path, capsys):
    cli = _instantiate("gaussian/direct", tmp_path, "--model.guidance", "0.7")
    assert cli.model.control_scale == 0.7
    notices = _notices(capsys)
    assert len(notices) == 1 and "guidance is renamed control_scale" in notices[0], notices


def test_old_and_new_name_together_are_refused():
    with pytest.raises(ValueError, match="guidance: is the old name of control_scale; give only control_scale"):
        ControlModule(
            AnalyticGaussian(dim=2),
            GaussianLogLikelihood(y=[1.0, 0.0]),
            DirectBackprop(),
            control_scale=0.5,
            guidance=0.7,
        )


def test_renamed_inference_time_package_and_smc_strength(capsys):
    from ctrl import guidance

    assert guidance.SMC is SMC  # class_path: ctrl.guidance.SMC still resolves
    smc = SMC(lam=4.0)
    assert smc.alpha == 0.25  # the strength is the fine-tuning plugins' KL weight: lam = 1 / alpha
    notices = _notices(capsys)
    assert any("ctrl.guidance is renamed ctrl.inference_time" in n for n in notices), notices
    assert any("lam is renamed alpha" in n for n in notices), notices


def test_renamed_setting_passes_values_through():
    assert renamed_setting("x", "old", None, "new", 3) == 3
    assert renamed_setting("x", "old", None, "new", None) is None


def test_a_nested_class_error_is_located_by_its_value():
    config = {
        "model": {
            "class_path": "ctrl.module.ControlModule",
            "init_args": {
                "reward": {
                    "class_path": "ctrl.rewards.JointLabels",
                    "init_args": {
                        "rewards": [
                            {"class_path": "ctrl.rewards.ClassifierLogProb", "init_args": {"path": "a.safetensors"}},
                            {"class_path": "ctrl.rewards.ClassifierLogProb", "init_args": {"path": "b.safetensors"}},
                        ]
                    },
                }
            },
        }
    }
    err = SettingError(ClassifierLogProb, "path", "no classifier file at 'b.safetensors'.", value="b.safetensors")
    assert str(err).startswith("ClassifierLogProb.path: ")
    assert str(err.locate(config)) == "model.reward.rewards[1].path: no classifier file at 'b.safetensors'."
    first = SettingError(ClassifierLogProb, "path", "bad", value="a.safetensors").locate(config)
    assert first.path == "model.reward.rewards[0]"


def test_plugin_errors_name_their_setting_path_through_the_cli(tmp_path):
    with pytest.raises(ValueError, match=r"^model.algorithm.clip_range: must be > 0, got 0.0"):
        _instantiate("gaussian/ppo", tmp_path, "--model.algorithm.clip_range", "0")


class Scribbler(PPO):
    def setup(self, policy, reward, context=None):
        super().setup(policy, reward, context)
        self.context.my_state = 1  # a plugin's own state belongs on the plugin


def test_a_plugin_writing_onto_the_context_is_refused():
    with pytest.raises(ValueError, match="AlgorithmContext has no setting 'my_state'"):
        ControlModule(AnalyticGaussian(dim=2), GaussianLogLikelihood(y=[1.0, 0.0]), Scribbler())


def test_the_module_gives_its_context_to_the_plugin():
    policy = AnalyticGaussian(dim=2)
    module = ControlModule(
        policy, GaussianLogLikelihood(y=[1.0, 0.0]), PPO(), num_steps=5, gradient_checkpointing=True
    )
    context = module.algorithm.context
    assert context is module.algorithm_context and isinstance(context, AlgorithmContext)
    assert (context.num_labels, context.num_stochastic, context.gradient_checkpointing) == (1, 4, True)
    assert torch.equal(context.sum_over_ranks(torch.ones(2)), torch.ones(2))  # one process: identity


def test_a_kl_logging_interval_below_one_is_refused():
    with pytest.raises(ValueError, match=r"^ControlModule\.kl_log_interval: must be >= 1 \(rollouts\) or null, got 0"):
        ControlModule(AnalyticGaussian(dim=2), GaussianLogLikelihood(y=[1.0, 0.0]), PPO(alpha=0.0), kl_log_interval=0)
