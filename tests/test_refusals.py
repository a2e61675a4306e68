"""Refusals: each bad input a user can give is answered by ONE clear message naming the setting the user wrote,
and loses nothing already saved.

A class built directly in Python names its own setting (``UNetPolicy.pretrained: ...``); through the ``ctrl``
command the message names the setting's path in the config (``model.policy.pretrained: ...``, or
``model.reward.rewards[1].path`` for a class nested in another), on one line ``ctrl: error: ...`` with no stack
trace and exit status 2, and a previous run's checkpoint and the model and classifier files keep their bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line, make_tiny_classifier, quiet_trainer, run_args, tiny_control_args
from PIL import Image

from ctrl.algorithms import DirectBackprop
from ctrl.errors import SettingError
from ctrl.module import ControlModule
from ctrl.policy import UNetPolicy, load_pretrained_unet
from ctrl.rewards import ClassifierLogProb, Reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"


# -- classes built directly: the class names its own setting ------------------------------------------------
class JpegSize(Reward):
    differentiable = False

    def forward(self, x0, labels):
        return torch.zeros(len(x0))


def _module(tiny_pretrained, tiny_classifier, **kw):
    policy = kw.pop("policy", None) or UNetPolicy(tiny_pretrained, num_labels=10)
    reward = kw.pop("reward", None) or ClassifierLogProb(tiny_classifier)
    return ControlModule(policy, reward, kw.pop("algorithm", DirectBackprop()), **kw)


def test_eta_out_of_range_or_zero_with_a_kl_is_refused(tiny_pretrained, tiny_classifier):
    with pytest.raises(ValueError, match=r"^ControlModule\.eta: must lie in \[0, 1\] .*got 1\.5"):
        _module(tiny_pretrained, tiny_classifier, eta=1.5)
    with pytest.raises(
        ValueError, match=r"^DirectBackprop\.alpha: is 0\.1 but model\.eta is 0: the KL of a deterministic chain"
    ):
        _module(tiny_pretrained, tiny_classifier, eta=0.0)
    _module(tiny_pretrained, tiny_classifier, eta=0.0, algorithm=DirectBackprop(alpha=0.0))  # AlignProp's chain


def test_classifier_label_count_must_match_policy(tiny_pretrained, tmp_path):
    five = make_tiny_classifier(tmp_path / "five.safetensors", num_labels=5)
    with pytest.raises(
        ValueError, match=r"^ControlModule\.reward: scores 5 labels but the policy has 10 \(policy.num_labels\)"
    ):
        _module(tiny_pretrained, five)


def test_non_differentiable_reward_refused_by_direct_backprop(tiny_pretrained, tiny_classifier):
    with pytest.raises(ValueError, match="DirectBackprop needs a differentiable reward, but JpegSize is not"):
        _module(tiny_pretrained, tiny_classifier, reward=JpegSize())


def test_missing_pretrained_path(tmp_path):
    with pytest.raises(ValueError, match=r"^UNetPolicy\.pretrained: no model directory at '.*nowhere'"):
        UNetPolicy(str(tmp_path / "nowhere"))


def test_a_class_built_directly_names_its_own_setting(tmp_path):
    """Built in Python, UNetPolicy does not know where a config would put it: the message names its class and
    setting; the loader itself says only what is wrong with the path, as a plain file error."""
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SettingError) as info:
        UNetPolicy(missing)
    err = info.value
    assert isinstance(err, ValueError) and (err.owner, err.key, err.value) == (UNetPolicy, "pretrained", missing)
    assert str(err) == f"UNetPolicy.pretrained: {err.problem}"
    assert err.problem.startswith(f"no model directory at '{missing}'; give a directory written by diffusers'")
    with pytest.raises(FileNotFoundError, match=f"^no model directory at '{re.escape(missing)}'"):
        load_pretrained_unet(missing)


def test_unreadable_pretrained_weights(tmp_path, tiny_pretrained):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pretrained, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"^UNetPolicy\.pretrained: could not load a diffusers UNet2DModel from"):
        UNetPolicy(str(broken))
    assert (Path(tiny_pretrained) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()  # source intact


def test_missing_and_corrupt_classifier(tmp_path):
    with pytest.raises(ValueError, match=r"^ClassifierLogProb\.path: no classifier file"):
        ClassifierLogProb(str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"^ClassifierLogProb\.path: .* is not a readable ctrl classifier"):
        ClassifierLogProb(str(bad))


def test_label_outside_label_set_at_evaluation(tiny_pretrained, tiny_classifier):
    module = _module(tiny_pretrained, tiny_classifier, evaluator=None)
    with pytest.raises(ValueError, match=r"labels \[11\] are outside the label set 0..9"):
        module.predict_step((torch.tensor([1, 11]), torch.tensor([0, 1])), 0)


def test_nothing_trainable_and_bad_lora_target(tiny_pretrained):
    with pytest.raises(ValueError, match="^UNetPolicy: nothing is trainable"):
        UNetPolicy(tiny_pretrained, label_embedding=False)
    with pytest.raises(ValueError, match=r"^UNetPolicy\.lora_target_modules: \['not_a_layer'\] match no module"):
        UNetPolicy(tiny_pretrained, lora_rank=2, lora_target_modules=["not_a_layer"])


def test_negative_alpha():
    with pytest.raises(ValueError, match=r"^DirectBackprop\.alpha: the KL weight must be >= 0, got -1"):
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
            "1.5",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "ctrl: error: model.eta: " in proc.stderr and "Traceback" not in proc.stderr


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
        ("SD dtype", sd(dtype="float64"), r"^StableDiffusionPolicy\.dtype: 'float64' is not one of"),
        ("SD negative classes", sd(num_classes=-1), r"^StableDiffusionPolicy\.num_classes: must be >= 0"),
        ("SD nothing trainable", sd(lora_rank=0), r"^StableDiffusionPolicy\.lora_rank: 0 leaves nothing trainable"),
        ("SD guidance below 1", sd(guidance_scale=0.5), r"^StableDiffusionPolicy\.guidance_scale: must be >= 1"),
        (
            "group size not dividing the batch",
            lambda: LabelsDataModule(batch_size=6, group_size=4),
            r"^LabelsDataModule\.batch_size: 6 is not a multiple of group_size 4",
        ),
        (
            "zero or negative group",
            lambda: LabelsDataModule(batch_size=6, group_size=0),
            r"^LabelsDataModule\.group_size: must be at least 1, got 0",
        ),
        (
            "test seeds in the validation range",
            lambda: LabelsDataModule(num_labels=2, eval_per_label=5, test_seed=7),
            r"^LabelsDataModule\.test_seed: 7 gives test seeds \[7, 17\) outside the test range",
        ),
        (
            "unknown label set",
            lambda: DigitsDataModule(label_set="colour"),
            r"^DigitsDataModule\.label_set: 'colour' is not a label set; "
            r"choose one of \['class', 'compressibility', 'ink'\]",
        ),
        (
            "unknown evaluator label set",
            lambda: LabelSetEvaluator(["ink", "colour"]),
            r"^LabelSetEvaluator\.label_sets: 'colour' is not a label set",
        ),
        (
            "JPEG boundaries not increasing",
            lambda: JpegSizeEvaluator([3.0, 2.0]),
            r"^JpegSizeEvaluator\.boundaries_kb: must be increasing and non-empty",
        ),
        (
            "joint reward of one",
            lambda: JointLabels([ClassifierLogProb(tiny_classifier)]),
            r"^JointLabels\.rewards: give at least two rewards that each score a label set",
        ),
        (
            "JPEG evaluator classes vs policy labels",
            lambda: _module(tiny_pretrained, tiny_classifier, evaluator=JpegSizeEvaluator([1.0, 2.0])),
            r"^JpegSizeEvaluator\.boundaries_kb: makes 3 conditions but the policy has 10; give one boundary fewer",
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


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_checkpoint_of_another_algorithm_or_policy_class(stage, tiny_pretrained, tiny_classifier):
    """A checkpoint records its policy and algorithm classes. Resuming training with another algorithm is refused
    (evaluating its policy is not: that needs the weights only); another policy is refused at every stage."""
    from types import SimpleNamespace

    module = _module(tiny_pretrained, tiny_classifier)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["ctrl"]["classes"] == {
        "policy": "ctrl.policy.unet.UNetPolicy",
        "algorithm": "ctrl.algorithms.direct.DirectBackprop",
    }
    module.trainer = SimpleNamespace(state=SimpleNamespace(fn=stage), ckpt_path="runs/a/last.ckpt", world_size=1)
    checkpoint["ctrl"]["classes"]["algorithm"] = "ctrl.algorithms.ppo.PPO"
    if stage == "fit":
        with pytest.raises(
            ValueError,
            match=r"^--ckpt_path: 'runs/a/last\.ckpt' was written by a run with model\.algorithm PPO "
            r"\(ctrl\.algorithms\.ppo\.PPO\), but this config's is DirectBackprop; resume with the config that "
            r"wrote it\. Starting another algorithm from a checkpoint's weights is a separate setting",
        ):
            module.on_load_checkpoint(checkpoint)
    else:
        module.on_load_checkpoint(checkpoint)
    checkpoint["ctrl"]["classes"]["policy"] = "ctrl.policy.gaussian.AnalyticGaussian"
    with pytest.raises(ValueError, match=r"^--ckpt_path: .* model\.policy AnalyticGaussian .* is UNetPolicy"):
        module.on_load_checkpoint(checkpoint)


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

    from ctrl.classifier import ClassifierTraining
    from ctrl.datamodules import DigitsDataModule

    trainer = quiet_trainer(tmp_path, 1)
    with pytest.raises(ValueError, match=expected):
        trainer.fit(
            ClassifierTraining(num_labels=num_labels, width=4, robust=False),
            DigitsDataModule(train_split="classifier", val_split="calibration", label_set=label_set),
        )


# -- through the ctrl command: one line naming the setting's path, nothing saved is touched -------------


class NaNReward(Reward):
    """A user's reward that breaks: NaN for every other sample."""

    differentiable = True
    num_labels = 10

    def forward(self, x0, labels):
        r = -x0.flatten(1).square().mean(1)
        return torch.where(torch.arange(len(r)) % 2 == 0, torch.full_like(r, float("nan")), r)


def _files(tmp_path):
    """Builders of the inputs a case needs, by name."""

    def five_label_classifier():
        return make_tiny_classifier(tmp_path / "five.safetensors", num_labels=5)

    def corrupt_checkpoint():
        (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint" * 64)
        return str(tmp_path / "garbage.ckpt")

    def truncated_classifier():
        whole = Path(make_tiny_classifier(tmp_path / "whole.safetensors")).read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
        return str(tmp_path / "cut.safetensors")

    def misspelled_yaml():
        (tmp_path / "bad.yaml").write_text(
            "model:\n  init_args:\n    algorithm:\n      class_path: DirectBackprop\n"
            "      init_args:\n        alpah: 0.2\n"
        )
        return str(tmp_path / "bad.yaml")

    def ppo_checkpoint():
        """A checkpoint of a PPO run of control.yaml's policy (what is refused is read before any weight)."""
        import lightning

        classes = {"policy": "ctrl.policy.unet.UNetPolicy", "algorithm": "ctrl.algorithms.ppo.PPO"}
        version = {"pytorch-lightning_version": lightning.__version__}
        torch.save({**version, "state_dict": {}, "ctrl": {"classes": classes}}, tmp_path / "ppo.ckpt")
        return str(tmp_path / "ppo.ckpt")

    def file_as_folder():
        (tmp_path / "a-file").write_text("")
        return str(tmp_path / "a-file" / "run")

    return locals()


# (case, extra arguments; "{name}" is replaced by the path _files builds, expected message)
TABLE = [
    (
        "misspelled setting",
        ["--model.init_args.num_stepz", "5"],
        r"model.num_stepz: ControlModule has no setting 'num_stepz' \(did you mean 'num_steps'\?\)",
    ),
    (
        "misspelled key in a YAML config",
        ["--config", "{misspelled_yaml}"],
        r"model.algorithm.alpah: DirectBackprop has no setting 'alpah' \(did you mean 'alpha'\?\)",
    ),
    (
        "misspelled trainer flag",
        ["--trainer.max_epochz", "1"],
        r"--trainer.max_epochz is not a setting \(did you mean '--trainer.max_epochs'\?\)",
    ),
    ("wrong type", ["--model.num_steps", "ten"], r"model.num_steps: expected a value of type int, got 'ten'"),
    (
        "unknown algorithm",
        ["--model.algorithm", "PPOO"],
        r"model.algorithm 'PPOO' is not an available algorithm; available: AlignProp, ContinuousTimePG, DDPO, DRaFT, "
        r"DirectBackprop, GRPO, PPO, RAFT",
    ),
    (
        "negative KL weight",
        ["--model.algorithm.init_args.alpha", "-1"],
        r"model\.algorithm\.alpha: the KL weight must be >= 0, got -1",
    ),
    (
        "clip range <= 0",
        ["--model.algorithm", json.dumps({"class_path": "PPO", "init_args": {"clip_range": 0}})],
        r"model\.algorithm\.clip_range: must be > 0, got 0",
    ),
    (
        "eta = 0 with a log-prob algorithm",
        ["--model.algorithm", "PPO", "--model.eta", "0"],
        r"model\.eta: is 0\.0: PPO does not backpropagate through the chain.*needs a stochastic sampler.*"
        r"set it in \(0, 1\]",
    ),
    (
        "eta = 0 with a KL weight",
        ["--model.eta", "0"],
        r"model\.algorithm\.alpha: is 0\.2 but model\.eta is 0: the KL of a deterministic chain to the pretrained "
        r"one is undefined \(no step has a density\); set alpha 0",
    ),
    (
        "accumulate < 1",
        ["--model.accumulate", "0"],
        r"model\.accumulate: must be >= 1 \(updates per optimizer step; 1: no accumulation\), got 0",
    ),
    (
        "negative learning rate",
        ["--model.policy.init_args.head_lr", "-1"],
        r"model\.policy\.head_lr: must be > 0, got -1\.0 \(the learning rate of the 'head' part\)",
    ),
    (
        "zero learning rate",
        ["--model.policy.bias_lr", "0"],
        r"model\.policy\.bias_lr: must be > 0, got 0\.0 \(the learning rate of the 'bias' part\)",
    ),
    (
        "more steps than the pretrained model's timesteps",
        ["--model.num_steps", "5000"],
        r"model\.num_steps: is 5000, more than the 1000 timesteps the pretrained model was trained with .*"
        r"set it to at most 1000",
    ),
    (
        "checkpoint of another algorithm",
        ["--ckpt_path", "{ppo_checkpoint}"],
        r"--ckpt_path: '.*ppo\.ckpt' was written by a run with model\.algorithm PPO \(ctrl\.algorithms\.ppo\.PPO\), "
        r"but this config's is DirectBackprop; resume with the config that wrote it",
    ),
    (
        "classifier and policy label counts differ",
        ["--model.reward.path", "{five_label_classifier}"],
        r"model\.reward: scores 5 labels but the policy has 10 \(policy.num_labels\)",
    ),
    (
        "missing pretrained model",
        ["--model.policy.pretrained", "/nowhere/model"],
        r"model.policy.pretrained: no model directory at '/nowhere/model'",
    ),
    (
        "truncated safetensors file",
        ["--model.reward.path", "{truncated_classifier}"],
        r"model.reward.path: '.*cut.safetensors' is not a readable ctrl classifier",
    ),
    (
        "missing checkpoint",
        ["--ckpt_path", "/nowhere/last.ckpt"],
        r"--ckpt_path: no checkpoint at '/nowhere/last.ckpt'",
    ),
    (
        "corrupt checkpoint",
        ["--ckpt_path", "{corrupt_checkpoint}"],
        r"--ckpt_path: '.*garbage.ckpt' is not a readable checkpoint",
    ),
    (
        "label prior not a distribution",
        ["--data.prior", json.dumps([0.5, 0.6] + [0.0] * 8)],
        r"data.prior: .* is not a probability distribution \(entries must be >= 0 and sum to 1; they sum to 1.1\)",
    ),
    (
        "GRPO with groups of one chain",
        ["--model.algorithm", "GRPO"],
        r"data\.group_size: is 1, but GRPO compares each chain with the rest of its condition's group: set "
        r"data\.group_size to 2 or more",
    ),
    (
        "GRPO batch not divisible into groups",
        ["--model.algorithm", "GRPO", "--data.group_size", "4", "--data.batch_size", "6"],
        r"data\.batch_size: 6 is not a multiple of group_size 4",
    ),
    ("too few evaluation steps", ["--model.eval_num_steps", "[1, 50]"], r"model\.eval_num_steps: must be at least 2"),
    ("max_bad_steps < 1", ["--model.max_bad_steps", "0"], r"model\.max_bad_steps: must be >= 1 or null"),
    (
        "NaN rewards from a user reward",
        ["--model.reward", "test_refusals.NaNReward", "--model.max_bad_steps", "2"],
        r"the reward returned NaN or Inf in 2 training steps \(model.max_bad_steps=2\); the run stops here",
    ),
    (
        "device that does not exist",
        ["--trainer.accelerator", "gpu"],
        r"trainer.accelerator=gpu but this machine has no GPU that torch can use; set --trainer.accelerator cpu",
    ),
    (
        "output folder not writable",
        ["--trainer.default_root_dir", "{file_as_folder}"],
        r"trainer.default_root_dir '.*a-file/run' is not writable",
    ),
]


def _digest(*paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case, extra, message", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_is_one_clear_message(
    case, extra, message, tmp_path, tiny_pretrained, tiny_classifier, monkeypatch, capsys
):
    root = tmp_path / "run"
    saved = root / "checkpoints" / "last.ckpt"  # what an earlier run left
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"an earlier run's checkpoint")
    before = _digest(saved, tiny_pretrained, tiny_classifier)

    files = _files(tmp_path)
    extra = [files[a[1:-1]]() if a.startswith("{") and a.endswith("}") and a[1:-1] in files else a for a in extra]
    line = error_line(["fit", *run_args(root, tiny_pretrained, tiny_classifier), *extra], monkeypatch, capsys)
    assert re.match(f"ctrl: error: (trainer settings: )?{message}", line), line
    assert _digest(saved, tiny_pretrained, tiny_classifier) == before


def _image_folder(tmp_path, size=16, mode="L", extra_file=None, labels=None):
    """Three images a.png, b.png, c.png (and ``extra_file``), with ``labels`` as labels.csv rows."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.new(mode, (size, size), color=40 * i if mode == "L" else (40 * i, 0, 0)).save(folder / name)
    if extra_file:
        (folder / extra_file).write_text("not an image")
    rows = labels if labels is not None else {"a.png": "1", "b.png": "2", "c.png": "3"}
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{f},{y}\n" for f, y in rows.items()))
    return str(folder), str(tmp_path / "labels.csv")


IMAGE_TABLE = [
    (
        "image folder with a non-image file",
        {"extra_file": "notes.txt"},
        r"data.root: 1 files are not images \(notes.txt\); keep only images",
    ),
    (
        "labels CSV missing a label",
        {"labels": {"a.png": "1", "c.png": "3"}},
        r"data.labels_csv: 1 images have no label \(b.png\); add a row `file,label` for each",
    ),
    (
        "labels CSV with an unknown label",
        {"labels": {"a.png": "cat", "b.png": "2", "c.png": "3"}},
        r"data\.labels_csv: the label 'cat' of a.png is not one of 0..9 \(num_labels\)",
    ),
    ("images of the wrong size", {"size": 8}, r"data\.image_size: is 16 but a.png is 8x8; resize the images"),
    (
        "images with the wrong channel count",
        {"mode": "RGB"},
        r"data\.channels: is 1 but a.png has 3 channels \(PIL mode RGB\)",
    ),
]


@pytest.mark.parametrize("case, folder, message", IMAGE_TABLE, ids=[row[0] for row in IMAGE_TABLE])
def test_bad_image_folder_is_one_clear_message(case, folder, message, tmp_path, monkeypatch, capsys):
    root, labels = _image_folder(tmp_path, **folder)
    data = {
        "class_path": "ctrl.datamodules.ImageFolderDataModule",
        "init_args": {"root": root, "labels_csv": labels, "image_size": 16, "channels": 1},
    }
    config = Path(__file__).resolve().parents[1] / "configs" / "digits" / "classifier.yaml"
    line = error_line(
        [
            "fit",
            "--config",
            str(config),
            "--data",
            json.dumps(data),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        monkeypatch,
        capsys,
    )
    assert re.match(f"ctrl: error: {message}", line), line


CLASSIFIER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "classifier.yaml"


def test_a_fit_without_an_optimizer_step_writes_nothing(tmp_path, monkeypatch, capsys):
    """A fit that ends without a step (here trainer.max_steps 0; a training set smaller than one batch did the
    same) would export its untrained weights as trained: refused in one line, the file already there kept."""
    out = tmp_path / "classifier.safetensors"
    out.write_bytes(b"an earlier classifier")
    argv = ["fit", "--config", str(CLASSIFIER_CONFIG), "--trainer.max_steps", "0", "--trainer.logger", "false"]
    argv += ["--model.export_path", str(out), "--trainer.default_root_dir", str(tmp_path / "run")]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(
        r"ctrl: error: the fit ended without an optimizer step, so nothing was written to .*classifier\.safetensors: "
        r"the training data gave no batch .*data\.batch_size",
        line,
    ), line
    assert out.read_bytes() == b"an earlier classifier"


def test_a_classifier_with_no_held_out_images_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The classifier calibrates its temperature on the held-out images: a folder split that holds out none is
    refused at the start of fit, naming data.val_fraction."""
    root, labels = _image_folder(tmp_path)
    data = {
        "class_path": "ctrl.datamodules.ImageFolderDataModule",
        "init_args": {"root": root, "labels_csv": labels, "image_size": 16, "channels": 1, "val_fraction": 0.1},
    }
    argv = ["fit", "--config", str(CLASSIFIER_CONFIG), "--data", json.dumps(data), "--trainer.logger", "false"]
    argv += ["--model.export_path", str(tmp_path / "c.safetensors"), "--trainer.default_root_dir", str(tmp_path)]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(r"ctrl: error: data\.val_fraction: holds out no image, .*a larger val_fraction", line), line
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("subcommand", ["validate", "predict"])
def test_evaluating_last_with_no_checkpoint_is_refused(subcommand, tmp_path, tiny_pretrained, monkeypatch, capsys):
    """``--ckpt_path last`` where no run wrote one: Lightning would warn and evaluate the untrained model; refused
    in one line naming the folders looked in (``fit`` starts afresh instead: a requeued job says ``last``)."""
    classifier = make_tiny_classifier(tmp_path / "c.safetensors")
    argv = [subcommand, *tiny_control_args(tmp_path / "run", tiny_pretrained, classifier), "--ckpt_path", "last"]
    line = error_line([*argv, "--trainer.logger", "false"], monkeypatch, capsys)
    assert re.match(
        r"ctrl: error: --ckpt_path last: no checkpoint in .*run or .*run/checkpoints, so " + subcommand, line
    ), line


def test_a_nested_class_is_named_by_its_path_in_the_config(tmp_path, tiny_pretrained, monkeypatch, capsys):
    """A multi-task reward holds two ClassifierLogProb: the one whose file is missing is named by its place in the
    config, model.reward.rewards[1].path, not by its class or the first classifier's path."""
    rewards = [
        {"class_path": "ctrl.rewards.ClassifierLogProb", "init_args": {"path": path}}
        for path in (make_tiny_classifier(tmp_path / "compress.safetensors", num_labels=4), "/nowhere/ink.safetensors")
    ]
    overlay = tmp_path / "tiny_rewards.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"reward": {"init_args": {"rewards": rewards}}}}}))
    root = tmp_path / "run"
    saved = root / "checkpoints" / "last.ckpt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"an earlier run's checkpoint")
    before = _digest(saved, tiny_pretrained, rewards[0]["init_args"]["path"])
    argv = ["fit", "--config", str(CONFIGS / "control.yaml"), "--config", str(CONFIGS / "tasks" / "multitask.yaml")]
    argv += ["--config", str(overlay), "--trainer.default_root_dir", str(root), "--trainer.logger", "false"]
    argv += ["--model.policy.pretrained", tiny_pretrained, "--model.evaluator.image_size", "8"]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(
        r"ctrl: error: model\.reward\.rewards\[1\]\.path: no classifier file at '/nowhere/ink\.safetensors'", line
    ), line
    assert _digest(saved, tiny_pretrained, rewards[0]["init_args"]["path"]) == before
