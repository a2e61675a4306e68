"""Each bad input a user can give is answered by one clear message naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_classifier

from ctrl.algorithms import DirectBackprop
from ctrl.module import ControlModule
from ctrl.policy import UNetPolicy
from ctrl.rewards import ClassifierLogProb, Reward


class JpegSize(Reward):
    differentiable = False

    def forward(self, x0, labels):
        return torch.zeros(len(x0))


def _module(tiny_pretrained, tiny_classifier, **kw):
    policy = kw.pop("policy", None) or UNetPolicy(tiny_pretrained, num_labels=10)
    reward = kw.pop("reward", None) or ClassifierLogProb(tiny_classifier)
    return ControlModule(policy, reward, kw.pop("algorithm", DirectBackprop()), **kw)


def test_eta_zero_is_refused(tiny_pretrained, tiny_classifier):
    with pytest.raises(ValueError, match=r"model.eta=0.*set model.eta in \(0, 1\]"):
        _module(tiny_pretrained, tiny_classifier, eta=0.0)


def test_classifier_label_count_must_match_policy(tiny_pretrained, tmp_path):
    five = make_tiny_classifier(tmp_path / "five.safetensors", num_labels=5)
    with pytest.raises(ValueError, match=r"reward scores 5 labels but the policy has 10 \(model.policy.num_labels\)"):
        _module(tiny_pretrained, five)


def test_non_differentiable_reward_refused_by_direct_backprop(tiny_pretrained, tiny_classifier):
    with pytest.raises(ValueError, match="DirectBackprop needs a differentiable reward, but JpegSize is not"):
        _module(tiny_pretrained, tiny_classifier, reward=JpegSize())


def test_missing_pretrained_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.policy.pretrained: no model directory at '.*nowhere'"):
        UNetPolicy(str(tmp_path / "nowhere"))


def test_unreadable_pretrained_weights(tmp_path, tiny_pretrained):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pretrained, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"model.policy.pretrained: could not load a diffusers UNet2DModel from"):
        UNetPolicy(str(broken))
    assert (Path(tiny_pretrained) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()  # source intact


def test_missing_and_corrupt_classifier(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.reward.path: no classifier file"):
        ClassifierLogProb(str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.reward.path: .* is not a readable ctrl classifier"):
        ClassifierLogProb(str(bad))


def test_label_outside_label_set_at_evaluation(tiny_pretrained, tiny_classifier):
    module = _module(tiny_pretrained, tiny_classifier, evaluator=None)
    with pytest.raises(ValueError, match=r"labels \[11\] are outside the label set 0..9"):
        module.predict_step((torch.tensor([1, 11]), torch.tensor([0, 1])), 0)


def test_nothing_trainable_and_bad_lora_target(tiny_pretrained):
    with pytest.raises(ValueError, match="nothing is trainable"):
        UNetPolicy(tiny_pretrained, label_embedding=False)
    with pytest.raises(ValueError, match=r"model.policy.lora_target_modules: \['not_a_layer'\] match no module"):
        UNetPolicy(tiny_pretrained, lora_rank=2, lora_target_modules=["not_a_layer"])


def test_negative_alpha():
    with pytest.raises(ValueError, match="alpha .* must be >= 0"):
        DirectBackprop(alpha=-1.0)


def test_command_line_error_is_one_message_without_traceback(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "digits" / "control.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctrl.cli",
            "fit",
            "--config",
            str(config),
            "--model.eta",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "model.eta=0" in proc.stderr and "Traceback" not in proc.stderr


def test_datamodule_label_count_must_match_policy(tiny_pretrained, tiny_classifier):
    from types import SimpleNamespace

    module = _module(tiny_pretrained, tiny_classifier)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(num_labels=7))  # what Lightning attaches
    with pytest.raises(ValueError, match="data.num_labels=7 but model.policy.num_labels=10"):
        module.setup("fit")


def _refusals(tiny_sd, tiny_pretrained, tiny_classifier):
    """(case, a call that must be refused, its message), for the settings this release added."""
    from ctrl.datamodules import DigitsDataModule, LabelsDataModule
    from ctrl.evaluation import JpegSizeEvaluator, LabelSetEvaluator
    from ctrl.policy import StableDiffusionPolicy
    from ctrl.rewards import JointLabels

    def sd(**kw):
        return lambda: StableDiffusionPolicy(tiny_sd, prompts=["a cat"], **kw)

    return [
        ("SD dtype", sd(dtype="float64"), r"model.policy.dtype: 'float64' is not one of"),
        ("SD negative classes", sd(num_classes=-1), r"model.policy.num_classes must be >= 0"),
        ("SD nothing trainable", sd(lora_rank=0), r"model.policy.lora_rank=0: nothing would be trainable"),
        ("SD guidance below 1", sd(guidance_scale=0.5), r"model.policy.guidance_scale must be >= 1"),
        (
            "group size not dividing the batch",
            lambda: LabelsDataModule(batch_size=6, group_size=4),
            r"data.batch_size=6 must be a multiple of data.group_size=4",
        ),
        (
            "zero or negative group",
            lambda: LabelsDataModule(batch_size=6, group_size=0),
            r"data.group_size must be at least 1, got 0",
        ),
        (
            "test seeds in the validation range",
            lambda: LabelsDataModule(num_labels=2, eval_per_label=5, test_seed=7),
            r"data.test_seed=7 gives test seeds \[7, 17\) outside the test range",
        ),
        (
            "unknown label set",
            lambda: DigitsDataModule(label_set="colour"),
            r"data.label_set: 'colour' is not a label set; choose one of \['class', 'compressibility', 'ink'\]",
        ),
        (
            "unknown evaluator label set",
            lambda: LabelSetEvaluator(["ink", "colour"]),
            r"model.evaluator.label_sets: 'colour' is not a label set",
        ),
        (
            "JPEG boundaries not increasing",
            lambda: JpegSizeEvaluator([3.0, 2.0]),
            r"model.evaluator.boundaries_kb must be increasing and non-empty",
        ),
        (
            "joint reward of one",
            lambda: JointLabels([ClassifierLogProb(tiny_classifier)]),
            r"model.reward.rewards: give at least two rewards that each score a label set",
        ),
        (
            "JPEG evaluator classes vs policy labels",
            lambda: _module(tiny_pretrained, tiny_classifier, evaluator=JpegSizeEvaluator([1.0, 2.0])),
            r"boundaries_kb makes 3 classes but the policy's reward labels number 10",
        ),
    ]


REFUSALS = [
    "SD dtype",
    "SD negative classes",
    "SD nothing trainable",
    "SD guidance below 1",
    "group size not dividing the batch",
    "zero or negative group",
    "test seeds in the validation range",
    "unknown label set",
    "unknown evaluator label set",
    "JPEG boundaries not increasing",
    "joint reward of one",
    "JPEG evaluator classes vs policy labels",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_new_settings_are_refused_with_one_message(case, tiny_sd, tiny_pretrained, tiny_classifier):
    cases = {name: (call, message) for name, call, message in _refusals(tiny_sd, tiny_pretrained, tiny_classifier)}
    assert sorted(cases) == sorted(REFUSALS)
    call, message = cases[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_checkpoint_without_the_trainable_weights_is_refused(tiny_pretrained, tiny_classifier):
    module = _module(tiny_pretrained, tiny_classifier)
    with pytest.raises(
        ValueError,
        match=r"the checkpoint lacks \d+ trainable weights of this model .*resume with "
        r"the config that wrote it",
    ):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.parametrize(
    "label_set, num_labels, expected",
    [
        (["compressibility", "ink"], 4, "data.label_set: a classifier learns one label set"),
        ("ink", 4, "model.num_labels=4 but the data's label set has 2 labels"),
    ],
)
def test_classifier_data_must_be_one_label_set_of_its_size(label_set, num_labels, expected, tmp_path):
    import lightning as L

    from ctrl.classifier import ClassifierTraining
    from ctrl.datamodules import DigitsDataModule

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=expected):
        trainer.fit(
            ClassifierTraining(num_labels=num_labels, width=4, robust=False),
            DigitsDataModule(train_split="classifier", val_split="calibration", label_set=label_set),
        )
