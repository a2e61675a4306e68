"""LogSamples: captioned sample grids in any Lightning logger. A short ``ctrl fit`` of the tiny digits control with a
CSV and a TensorBoard logger writes a grid at validation, at test and every N training steps; each grid has exactly
one cell per sample shown, a caption strip under each cell, and captions whose rewards are the logged ones. The tiny
Stable Diffusion pipeline's captions show its prompts; W&B and MLflow get theirs through their own calls."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import error_line, tiny_control_args, tiny_sd_args
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from PIL import Image

from ctrl.callbacks import LogSamples, log_grid, spread
from ctrl.commands import main
from ctrl.errors import SettingError
from ctrl.images import CAPTION_BACKGROUND, captioned_grid, grid_count, grid_shape

EVERY = 2


def _loggers(root: Path) -> str:
    return json.dumps(
        [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root / "csv")}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root / "tb")}},
        ]
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, tiny_pretrained, tiny_classifier) -> Path:
    """5 rollouts of 4 chains (one optimizer step each), grids every 2 steps, 20 evaluation samples (2 per label)
    at validation and test, logged to CSV and TensorBoard; returns the run's folder."""
    root = tmp_path_factory.mktemp("log-samples")
    callbacks = [{"class_path": "ctrl.callbacks.LogSamples", "init_args": {"every_n_steps": EVERY, "max_images": 20}}]
    args = [
        *tiny_control_args(root, tiny_pretrained, tiny_classifier),
        *["--trainer.logger", _loggers(root), "--trainer.callbacks", json.dumps(callbacks)],
        *["--data.batches_per_epoch", "5", "--trainer.log_every_n_steps", "1"],
    ]
    assert main(["fit", *args]).trainer.global_step == 5
    return root


def _csv_dir(root: Path) -> Path:
    return root / "csv" / "lightning_logs" / "version_0"


def _grids(root: Path, tag: str) -> dict[int, tuple[Image.Image, dict]]:
    """Optimizer step -> (PNG, JSON) of the grids logged under ``tag`` by the CSV logger."""
    folder = _csv_dir(root) / "images" / tag
    out = {}
    for png in folder.glob("step_*.png"):
        out[int(png.stem.removeprefix("step_"))] = (
            Image.open(png).convert("RGB"),
            json.loads(png.with_suffix(".json").read_text()),
        )
    return out


def _metrics(root: Path) -> list[dict[str, str]]:
    with open(_csv_dir(root) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _tiles(grid: Image.Image, layout: dict):
    """Each tile's image area and caption strip as uint8 arrays ``[h, w, 3]``, row-major."""
    pixels, b = np.asarray(grid), layout["border"]
    h, w, c = layout["cell_height"], layout["cell_width"], layout["caption_height"]
    for i in range(layout["rows"] * layout["cols"]):
        y, x = (i // layout["cols"]) * (h + c + 2 * b) + b, (i % layout["cols"]) * (w + 2 * b) + b
        yield pixels[y : y + h, x : x + w], pixels[y + h : y + h + c, x : x + w]


def _assert_captioned_grid(grid: Image.Image, layout: dict, count: int) -> None:
    """One cell per sample (no padding) and under each a caption strip with text on it."""
    rows, cols, b = layout["rows"], layout["cols"], layout["border"]
    assert rows * cols == count
    assert grid.size == (
        cols * (layout["cell_width"] + 2 * b),
        rows * (layout["cell_height"] + layout["caption_height"] + 2 * b),
    )
    strips = []
    for _, strip in _tiles(grid, layout):
        background = (strip == CAPTION_BACKGROUND).all(-1)
        assert background.mean() > 0.5  # a strip, not image content
        assert (strip.max(-1) < 100).any()  # dark text on it
        strips.append(strip)
    assert len({s.tobytes() for s in strips}) == count  # each cell's own caption (the rewards differ)


# -- the digits run: CSV and TensorBoard ---------------------------------------------------------------------------


def test_grids_at_validation_test_and_every_n_training_steps(digits_run):
    assert sorted(_grids(digits_run, "train/samples")) == [2, 4]  # steps 1, 3 and 5 are no multiple of 2
    assert sorted(_grids(digits_run, "val/samples")) == [5]  # the end of the epoch
    assert sorted(_grids(digits_run, "test/samples")) == [5]  # test_after_fit


def test_each_grid_is_one_captioned_cell_per_sample(digits_run):
    for tag, count in (("train/samples", 4), ("val/samples", 20), ("test/samples", 20)):
        for grid, record in _grids(digits_run, tag).values():
            assert len(record["samples"]) == count, tag  # the whole rollout; every evaluation sample (20 = 4 x 5)
            _assert_captioned_grid(grid, record, count)
            for cell, _ in _tiles(grid, record):  # the grey digits images, enlarged 32 times (8 -> 256 pixels)
                assert cell.shape[:2] == (256, 256)
                assert (cell[..., 0] == cell[..., 1]).all() and (cell[..., 1] == cell[..., 2]).all()
                assert (cell == cell[::32, ::32].repeat(32, 0).repeat(32, 1)).all()


def test_captions_name_the_conditions_and_the_logged_rewards(digits_run):
    rows = _metrics(digits_run)
    for tag in ("val", "test"):
        [(_, record)] = _grids(digits_run, f"{tag}/samples").values()
        samples = record["samples"]
        assert [s["condition"] for s in samples] == [f"label {y}" for y in list(range(10)) * 2]  # each in turn
        logged = [float(r[f"{tag}/reward"]) for r in rows if r[f"{tag}/reward"]]
        assert len(logged) == 1 and np.mean([s["reward"] for s in samples]) == pytest.approx(logged[0], rel=1e-5)
    train = {int(r["step"]): float(r["train/reward"]) for r in rows if r["train/reward"]}
    assert len(train) == 5
    for step, (_, record) in _grids(digits_run, "train/samples").items():
        assert record["step"] == step and record["logger_step"] == step - 1  # beside its rollout's scalars
        assert all(s["condition"] == f"label {s['label']}" for s in record["samples"])
        mean = np.mean([s["reward"] for s in record["samples"]])
        assert mean == pytest.approx(train[record["logger_step"]], rel=1e-5)


def test_tensorboard_event_file_holds_the_grids(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(digits_run / "tb" / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/samples", "val/samples", "test/samples"} <= set(events.Tags()["images"])
    for tag in ("train/samples", "val/samples", "test/samples"):
        grids = _grids(digits_run, tag)
        logged = events.Images(tag)
        assert [e.step for e in logged] == sorted(record["logger_step"] for _, record in grids.values())
        for event, (grid, _) in zip(logged, (grids[s] for s in sorted(grids))):
            assert (event.width, event.height) == grid.size


# -- Stable Diffusion: prompts in the captions ---------------------------------------------------------------------


def test_stable_diffusion_captions_show_prompt_and_class(tmp_path, tiny_sd, tiny_rgb_classifier):
    """No LogSamples in the config: the module's own logs the evaluation samples, and only those."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    args = tiny_sd_args(
        "compressibility",
        tmp_path,
        tiny_sd,
        ["--model.reward.path", tiny_rgb_classifier],
        *["--trainer.logger", json.dumps(logger), "--trainer.callbacks", "[]"],
    )
    main(["fit", *args])
    assert not (_csv_dir(tmp_path) / "images" / "train").exists()
    [(grid, record)] = _grids(tmp_path, "val/samples").values()
    names = [s["condition"] for s in record["samples"]]  # 2 prompts x 4 classes, one sample each
    assert sorted(names) == sorted(f"{p} | class {k}" for p in ("a cat", "a dog") for k in range(4))
    _assert_captioned_grid(grid, record, 8)
    logged = [float(r["val/reward"]) for r in _metrics(tmp_path) if r["val/reward"]]
    assert np.mean([s["reward"] for s in record["samples"]]) == pytest.approx(logged[-1], rel=1e-5)


# -- the pieces ----------------------------------------------------------------------------------------------------


def test_grid_counts_fill_the_grid_exactly():
    for n in range(1, 50):
        rows, cols = grid_shape(n)
        assert rows * cols == n and rows <= cols
        m = grid_count(n, 64)
        rows, cols = grid_shape(m)
        assert m <= n and (cols <= 2 * rows or m <= 3)
    assert [grid_count(n, 64) for n in (4, 5, 7, 8, 11, 20)] == [4, 4, 6, 8, 9, 20]
    assert grid_count(500, 16) == 16 and grid_count(3, 16) == 3


def test_spread_takes_one_of_each_condition_in_turn():
    labels = torch.tensor([2, 2, 0, 1, 2, 0])
    assert spread(labels, 64).tolist() == [2, 3, 0, 5, 1, 4]  # 0, 1, 2 in order of first sample, then again
    assert spread(labels, 4).tolist() == [2, 3, 0, 5]


def test_captioned_grid_keeps_the_pixels_and_wraps_long_captions():
    images = torch.linspace(-1, 1, 6)[:, None, None, None].expand(6, 3, 16, 8).contiguous()
    captions = [f"prompt {i} with quite a few words to wrap over lines\nreward {i}" for i in range(6)]
    grid, layout = captioned_grid(images, captions, size=64)
    assert (layout["rows"], layout["cols"], layout["cell_height"], layout["cell_width"]) == (2, 3, 64, 32)
    _assert_captioned_grid(grid, layout, 6)
    for (cell, _), value in zip(_tiles(grid, layout), torch.linspace(-1, 1, 6)):
        assert (cell == round((float(value) + 1) * 127.5)).all()
    shrunk, layout = captioned_grid(torch.zeros(2, 3, 512, 256), ["a", "b"], size=128)
    assert (layout["cell_height"], layout["cell_width"]) == (128, 64)


class _FakeWandb(WandbLogger):
    def __init__(self):  # no wandb package needed: only the call is checked
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step, kwargs))


class _FakeMlflow(MLFlowLogger):
    run_id = "run-1"

    def __init__(self):
        self.experiment = SimpleNamespace(
            log_image=lambda *args: self.calls.append(("image", *args)),
            log_dict=lambda *args: self.calls.append(("dict", *args)),
        )
        self.calls = []

    experiment = None  # an attribute in place of the property that would start an MLflow client


class _SomeOtherLogger(Logger):
    name, version = "other", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_wandb_and_mlflow_get_the_grid_through_their_own_calls(capsys):
    wandb, mlflow = _FakeWandb(), _FakeMlflow()
    trainer = SimpleNamespace(
        global_step=7,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=3)),
        loggers=[wandb, mlflow, _SomeOtherLogger()],
    )
    names = ["a cat | class 0", "a dog | class 1"]
    log_grid(
        trainer, "val/samples", torch.zeros(2, 3, 8, 8), names, torch.tensor([0, 3]), torch.tensor([0.5, 1.5]), 64
    )
    [(key, images, step, kwargs)] = wandb.calls
    assert key == "val/samples" and step == 3 and len(images) == 2 and images[0].size == (64, 64)
    assert kwargs["caption"] == ["a cat | class 0\nreward 0.5", "a dog | class 1\nreward 1.5"]
    (kind, run, image, path), (kind2, run2, record, path2) = mlflow.calls
    assert (kind, run, path) == ("image", "run-1", "images/val/samples/step_7.png") and isinstance(image, Image.Image)
    assert (kind2, run2, path2) == ("dict", "run-1", "images/val/samples/step_7.json")
    assert [s["condition"] for s in record["samples"]] == names and record["logger_step"] == 3
    assert "LogSamples logs no images to _SomeOtherLogger" in capsys.readouterr().err


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("every_n_steps", 0, "must be >= 1 (or None: evaluation samples only), got 0."),
        ("max_images", 0, "must be >= 1, got 0."),
        ("cell_size", 16, "must be >= 64 pixels (room for a caption), got 16."),
    ],
)
def test_bad_settings_are_refused_in_one_line(
    setting, value, message, tmp_path, tiny_pretrained, tiny_classifier, monkeypatch, capsys
):
    with pytest.raises(SettingError) as err:
        LogSamples(**{setting: value})
    assert str(err.value) == f"LogSamples.{setting}: {message}"
    callbacks = [{"class_path": "ctrl.callbacks.LogSamples", "init_args": {setting: value}}]
    argv = [
        "fit",
        *tiny_control_args(tmp_path, tiny_pretrained, tiny_classifier),
        "--trainer.callbacks",
        json.dumps(callbacks),
    ]
    line = error_line(argv, monkeypatch, capsys)
    assert re.fullmatch(rf"ctrl: error: trainer\.callbacks.*{setting}: {re.escape(message)}", line), line
