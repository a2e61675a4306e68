"""Tiny models built locally: nothing downloads, everything runs on the CPU in seconds."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

# fixtures below; tests import them
from ctrl.testing import make_tiny_aesthetic, make_tiny_clip, make_tiny_sd, make_tiny_sd3  # noqa: F401

# at most 2 threads (CI's), fewer when OMP_NUM_THREADS asks: a suite beside another job must not oversubscribe;
# one per pytest-xdist worker (addopts runs a worker per core: tiny models gain more from that than from threads)
_threads = 1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, int(os.environ.get("OMP_NUM_THREADS") or 2))
torch.set_num_threads(max(1, min(_threads, os.cpu_count() or 1)))


def make_tiny_pretrained(directory, sample_size: int = 8, seed: int = 0) -> str:
    """A random tiny UNet2DModel and DDPM schedule saved in diffusers' layout (unet/, scheduler/)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing").save_pretrained(
        directory / "scheduler"
    )
    return str(directory)


def make_tiny_classifier(path, num_labels: int = 10, seed: int = 0) -> str:
    from ctrl.classifier import ConvClassifier, save_classifier

    torch.manual_seed(seed)
    save_classifier(ConvClassifier(num_labels=num_labels, width=4), 1.5, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    return make_tiny_pretrained(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-clf") / "classifier.safetensors")


def tiny_control_args(root, pretrained: str, classifier: str) -> list[str]:
    """Arguments of a tiny digits-control run: configs/digits/control.yaml with the tiny models (8x8),
    3 steps, batches of 4 and 2 evaluation samples per label, writing into ``root``."""
    from pathlib import Path

    return [
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "digits" / "control.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *["--model.policy.pretrained", pretrained, "--model.reward.path", classifier],
        *"--model.evaluator.image_size 8 --model.num_steps 3 --data.batch_size 4".split(),
        *"--data.eval_per_label 2 --data.eval_batch_size 10".split(),
    ]


def quiet_trainer(root, max_steps: int):
    """A CPU Lightning Trainer that writes and prints nothing but its errors, for ``max_steps`` steps."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def run_args(root, pretrained: str, classifier: str, *extra: str, checkpoint_every: int = 2) -> list[str]:
    """:func:`tiny_control_args` for 6 rollouts, without a logger, with a resumable checkpoint every
    ``checkpoint_every`` optimizer steps as the only callback."""
    callbacks = [
        {"class_path": "ctrl.callbacks.ResumableCheckpoint", "init_args": {"every_n_train_steps": checkpoint_every}}
    ]
    return [
        *tiny_control_args(root, pretrained, classifier),
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--data.batches_per_epoch",
        "6",
        *extra,
    ]


def final_state(root) -> tuple[dict, dict]:
    """The trainable weights, optimizer state and last metrics in ``root/checkpoints/last.ckpt``."""
    ckpt = torch.load(f"{root}/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    return ckpt["state_dict"], {"optimizer": ckpt["optimizer_states"], **ckpt["ctrl"]}


def assert_same(a, b, atol: float, path: str = "") -> None:
    """Nested dicts/lists of tensors and numbers equal within ``atol``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, atol, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0), path
    elif isinstance(a, float):
        assert abs(a - b) <= atol * max(1.0, abs(a)), f"{path}: {a} != {b}"
    else:
        assert a == b, path


_REPORTS: list[str] = []


def report(line: str) -> None:
    """A line for the end of the pytest run (e.g. that the SLURM test really ran)."""
    _REPORTS.append(line)


def pytest_terminal_summary(terminalreporter):
    for line in _REPORTS:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny CLIP model with both towers and its processor (CLIPScore's and PickScore's shape)."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_aesthetic(tmp_path_factory) -> tuple[str, str]:
    return make_tiny_aesthetic(tmp_path_factory.mktemp("tiny-aesthetic"))


@pytest.fixture(scope="session")
def tiny_rgb_classifier(tmp_path_factory) -> str:
    """A 4-class classifier of RGB images (the conditional-compressibility reward's shape)."""
    from ctrl.classifier import ConvClassifier, save_classifier

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-rgb-clf") / "classifier.safetensors"
    save_classifier(ConvClassifier(num_labels=4, channels=3, width=4), 1.0, path)
    return str(path)


def tiny_sd_args(config: str, root, pipeline: str, reward: list[str], *extra: str) -> list[str]:
    """Arguments of a tiny run of ``configs/sd15/<config>.yaml`` on the CPU: the tiny pipeline in float32,
    two prompts, 3 steps, 2 rollouts of 4 chains, no logger; ``reward`` swaps in tiny reward weights."""
    from pathlib import Path

    return [
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "sd15" / f"{config}.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.max_epochs",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.policy.pretrained",
        pipeline,
        "--model.policy.dtype",
        "float32",
        "--model.policy.prompts",
        '["a cat", "a dog"]',
        "--model.num_steps",
        "3",
        "--model.eval_num_steps",
        "3",
        "--data.batch_size",
        "4",
        "--data.group_size",
        "2",
        "--data.batches_per_epoch",
        "2",
        "--data.eval_per_label",
        "1",
        *reward,
        *extra,
    ]


def error_line(argv: list[str], monkeypatch, capsys) -> str:
    """Runs ``ctrl <argv>`` and returns its one ``ctrl: error:`` line, asserting exit status 2, exactly one
    such line and no stack trace."""
    from ctrl.cli import console

    monkeypatch.setattr(sys, "argv", ["ctrl", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ctrl: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def randomize_lora(module, seed: int | None = None) -> None:
    """Draw every LoRA weight of ``module`` from N(0, 0.3^2), after ``torch.manual_seed(seed)`` when given: a
    policy that differs from the pretrained model (LoRA's B starts at zero)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
