"""The bad-input table: each input a user can get wrong, through the `ctrl` command, is answered by ONE line
``ctrl: error: ...`` that names the setting (no stack trace, exit status 2), and nothing already saved is
touched: a previous run's checkpoint and the model and classifier files keep their bytes."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_classifier, run_args
from PIL import Image

from ctrl.cli import console
from ctrl.rewards import Reward


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
        r"model.algorithm 'PPOO' is not an available algorithm; available: ContinuousTimePG, DirectBackprop, PPO",
    ),
    (
        "negative KL weight",
        ["--model.algorithm.init_args.alpha", "-1"],
        r"DirectBackprop alpha \(the KL weight\) must be >= 0, got -1",
    ),
    (
        "clip range <= 0",
        ["--model.algorithm", json.dumps({"class_path": "PPO", "init_args": {"clip_range": 0}})],
        r"PPO clip_range must be > 0, got 0",
    ),
    (
        "eta = 0 with a log-prob algorithm",
        ["--model.algorithm", "PPO", "--model.eta", "0"],
        r"model.eta=0.0: RL fine-tuning needs a stochastic sampler.*set model.eta in \(0, 1\]",
    ),
    (
        "classifier and policy label counts differ",
        ["--model.reward.path", "{five_label_classifier}"],
        r"the reward scores 5 labels but the policy has 10 \(model.policy.num_labels\)",
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
    ("too few evaluation steps", ["--model.eval_num_steps", "[1, 50]"], r"model.eval_num_steps must be at least 2"),
    ("max_bad_steps < 1", ["--model.max_bad_steps", "0"], r"model.max_bad_steps must be >= 1 or null"),
    (
        "NaN rewards from a user reward",
        ["--model.reward", "test_guarded_inputs.NaNReward", "--model.max_bad_steps", "2"],
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


def _the_error_line(argv: list[str], monkeypatch, capsys) -> str:
    """Runs ``ctrl <argv>`` and returns its one ``ctrl: error:`` line, asserting exit status 2, exactly one
    such line and no stack trace."""
    monkeypatch.setattr(sys, "argv", ["ctrl", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ctrl: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


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
    line = _the_error_line(["fit", *run_args(root, tiny_pretrained, tiny_classifier), *extra], monkeypatch, capsys)
    assert re.search(message, line), line
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
        r"data.labels_csv: the label 'cat' of a.png is not one of 0..9 \(data.num_labels\)",
    ),
    ("images of the wrong size", {"size": 8}, r"data.image_size=16 but a.png is 8x8; resize the images"),
    (
        "images with the wrong channel count",
        {"mode": "RGB"},
        r"data.channels=1 but a.png has 3 channels \(PIL mode RGB\)",
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
    line = _the_error_line(
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
    assert re.search(message, line), line
