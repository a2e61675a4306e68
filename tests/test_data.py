"""Digits splits and the label prior."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctrl.datamodules import LabelsDataModule, digits_split
from ctrl.datamodules.digits_data import SPLITS
from ctrl.seeds import TRAINING


def test_splits_are_disjoint_fixed_and_cover_the_data():
    seen = []
    for name in SPLITS:
        images, labels = digits_split(name)
        assert images.shape[1:] == (1, 16, 16) and images.min() >= -1 and images.max() <= 1
        assert len(images) == len(labels) and set(labels.tolist()) == set(range(10))
        seen.append(images.flatten(1))
    everything = torch.cat(seen)
    assert len(everything) == 1797
    # no image (as pixels) appears in two splits: distinct rows = all rows of the bundled data set
    assert len(torch.unique(everything, dim=0)) == len(torch.unique(torch.cat(seen), dim=0))
    a, _ = digits_split("heldout")
    b, _ = digits_split("heldout")
    assert torch.equal(a, b)


def test_label_batches_follow_the_prior():
    dm = LabelsDataModule(num_labels=4, prior=[0.5, 0.25, 0.25, 0.0], batch_size=8, batches_per_epoch=3)
    for labels, seeds in dm.train_dataloader():
        counts = torch.bincount(labels, minlength=4)
        assert counts.tolist() == [4, 2, 2, 0]
        assert len(seeds.unique()) == 8


def test_uniform_prior_is_stratified_and_reproducible():
    dm = LabelsDataModule(num_labels=10, batch_size=20, batches_per_epoch=2, seed=3)
    first = list(dm.train_dataloader())
    assert all(torch.bincount(labels, minlength=10).tolist() == [2] * 10 for labels, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, dm.train_dataloader()))
    all_seeds = torch.cat([seeds for _, seeds in first])
    assert len(all_seeds.unique()) == 40 and all(int(s) in TRAINING for s in all_seeds)  # never an evaluation seed


def test_each_epoch_draws_new_chains():
    dm = LabelsDataModule(num_labels=10, batch_size=20, batches_per_epoch=2, seed=3)
    loader = dm.train_dataloader()
    first = torch.cat([seeds for _, seeds in loader])
    loader.dataset.epoch = 1
    second = {loader.dataset[k][1] for k in range(len(loader.dataset))}
    assert len(second) == 40 and not set(first.tolist()) & second


def test_ranks_split_each_global_batch():
    """Under DDP (Lightning's DistributedSampler, no shuffle) the ranks' batches are disjoint parts of the
    single-process batch: the same chains, labels and seeds, whatever the number of ranks."""
    from torch.utils.data import DistributedSampler

    dm = LabelsDataModule(num_labels=10, batch_size=8, batches_per_epoch=3, seed=1)
    whole = list(dm.train_dataloader())
    dataset = dm.train_dataloader().dataset
    for b, (labels, seeds) in enumerate(whole):
        parts = []
        for rank in range(2):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
            parts += [dataset[k] for k in list(sampler)[b * 4 : (b + 1) * 4]]
        assert sorted(parts) == sorted(zip(labels.tolist(), seeds.tolist()))


def test_resumed_loader_continues_where_it_stopped():
    dm = LabelsDataModule(num_labels=10, batch_size=4, batches_per_epoch=5, seed=2)
    whole = [seeds for _, seeds in dm.train_dataloader()]
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "consumed": 3})
    resumed = [seeds for _, seeds in loader]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))
    assert len(list(loader)) == 5  # the skip applies to the resumed epoch only


def test_eval_labels_are_balanced_with_fixed_seeds():
    dm = LabelsDataModule(num_labels=3, eval_per_label=4, eval_batch_size=5)
    labels, seeds = (torch.cat(x) for x in zip(*dm.val_dataloader()))
    assert torch.bincount(labels).tolist() == [4, 4, 4]
    assert len(set(seeds.tolist())) == 12


@pytest.mark.parametrize(
    "prior, message",
    [
        ([0.5, 0.5], "has 2 entries but there are 3 labels"),
        ([0.5, 0.6, -0.1], "not a probability distribution"),
        ([0.2, 0.2, 0.2], "sum to 0.6"),
    ],
)
def test_bad_prior_is_one_clear_message(prior, message):
    with pytest.raises(ValueError, match=message):
        LabelsDataModule(num_labels=3, prior=prior)


def test_predict_label_outside_label_set():
    with pytest.raises(ValueError, match=r"^LabelsDataModule\.predict_labels: \[12\] are outside the label set 0..9"):
        LabelsDataModule(num_labels=10, predict_labels=[3, 12])


def test_settings_checked_when_the_run_starts_name_data():
    """Without num_labels the label set is the policy's, known when the run starts: the datamodule is then the
    run's ``data``, and its settings are named so."""
    from types import SimpleNamespace

    dm = LabelsDataModule(num_labels=None, prior=[0.5, 0.5])
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(policy=SimpleNamespace(num_labels=3)))
    with pytest.raises(ValueError, match=r"^data\.prior: has 2 entries but there are 3 labels"):
        dm.setup("fit")


def test_image_folder_gives_labelled_batches(tmp_path):
    from PIL import Image

    from ctrl.datamodules import ImageFolderDataModule

    (tmp_path / "images").mkdir()
    for i in range(10):
        Image.new("L", (8, 8), color=25 * i).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 3}\n" for i in range(10)))
    dm = ImageFolderDataModule(
        str(tmp_path / "images"),
        str(tmp_path / "labels.csv"),
        num_labels=3,
        image_size=8,
        val_fraction=0.2,
        batch_size=4,
    )
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert len(dm.val_set) == 2 and len(dm.train_set) == 8
    # each image keeps its own label: pixel value 25 * i <-> label i % 3; together the splits are all 10
    seen = []
    for x, y in [*zip(*dm.train_set.tensors), *zip(*dm.val_set.tensors)]:
        i = round(float((x[0, 0, 0] + 1) * 127.5) / 25)
        assert int(y) == i % 3
        seen.append(i)
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize(
    "setup, kwargs, error, message",
    [
        (
            "csv names an absent file",
            {},
            ValueError,
            r"^ImageFolderDataModule\.labels_csv: names 1 files that are not in root \(ghost.png\); remove those rows",
        ),
        (
            "csv without header",
            {"header": "name,class"},
            ValueError,
            r"^ImageFolderDataModule\.labels_csv: .* needs a header line `file,label`",
        ),
        (
            "channels",
            {"channels": 2},
            ValueError,
            r"^ImageFolderDataModule\.channels: must be 1 \(grayscale\) or 3 \(RGB\), got 2",
        ),
        (
            "val_fraction",
            {"val_fraction": 1.0},
            ValueError,
            r"^ImageFolderDataModule\.val_fraction: must lie in \[0, 1\), got 1.0",
        ),
        (
            "no folder",
            {"root": "/nowhere/images"},
            ValueError,
            r"^ImageFolderDataModule\.root: no folder at '/nowhere/images'",
        ),
        (
            "empty folder",
            {"empty": True},
            ValueError,
            r"^ImageFolderDataModule\.root: '.*' holds no files; put the images in it",
        ),
        (
            "no csv",
            {"labels_csv": "/nowhere/labels.csv"},
            ValueError,
            r"^ImageFolderDataModule\.labels_csv: no file at '/nowhere/labels.csv'",
        ),
    ],
)
def test_image_folder_refusals(setup, kwargs, error, message, tmp_path):
    from PIL import Image

    from ctrl.datamodules import ImageFolderDataModule

    folder = tmp_path / "images"
    folder.mkdir()
    if not kwargs.pop("empty", False):
        Image.new("L", (8, 8)).save(folder / "a.png")
    header = kwargs.pop("header", "file,label")
    (tmp_path / "labels.csv").write_text(f"{header}\na.png,1\nghost.png,2\n")
    args = {"root": str(folder), "labels_csv": str(tmp_path / "labels.csv"), "image_size": 8, **kwargs}
    with pytest.raises(error, match=message):
        ImageFolderDataModule(**args)


def test_global_batch_must_divide_among_processes():
    from types import SimpleNamespace

    dm = LabelsDataModule(num_labels=10, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(
        ValueError,
        match=r"data.batch_size=8 is the global batch and must divide evenly among the 3 "
        r"processes .*make it a multiple of 3",
    ):
        dm.train_dataloader()


def test_evaluation_seed_sets_are_disjoint_and_fixed():
    """Validation, test and training chains come from disjoint seed ranges (in the low 32 bits that torch's
    generator keeps), and the evaluation sets do not move with the run's seed."""
    from ctrl.seeds import TEST, VALIDATION

    a, b = (
        LabelsDataModule(num_labels=3, eval_per_label=4, seed=0),
        LabelsDataModule(num_labels=3, eval_per_label=4, seed=5),
    )
    val, test = (
        [s for _, seeds in loader for s in seeds.tolist()] for loader in (a.val_dataloader(), a.test_dataloader())
    )
    assert all(s in VALIDATION for s in val) and all(s in TEST for s in test) and len(set(val)) == len(val) == 12
    assert val == [s for _, seeds in b.val_dataloader() for s in seeds.tolist()]
    train = {int(s) % (1 << 32) for _, seeds in a.train_dataloader() for s in seeds}
    assert not train & (set(val) | set(test))


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("test_seed", 100, r"^LabelsDataModule\.test_seed: 100 gives test seeds \[100, 130\) outside the test range"),
        (
            "val_seed",
            1 << 30,
            r"^LabelsDataModule\.val_seed: 1073741824 gives validation seeds .* outside the validation range",
        ),
        ("val_seed", (1 << 30) - 10, r"^LabelsDataModule\.val_seed: .*choose val_seed in \[0, 1073741794\]"),
    ],
)
def test_evaluation_seeds_outside_their_set_are_refused(setting, value, message):
    with pytest.raises(ValueError, match=message):
        LabelsDataModule(num_labels=3, eval_per_label=10, **{setting: value})


def test_labelled_images_per_class_are_the_same_first_ones():
    """The labelled-data budget: the first n images of each class of the training split, the same ones for every
    model that learns from them; other splits whole; a class with fewer is refused in one line."""
    from ctrl.datamodules import DigitsDataModule

    def train_data(**kwargs):
        return DigitsDataModule(train_split="classifier", val_split="calibration", **kwargs).train_dataloader().dataset

    x, y = train_data(labelled_per_class=10).tensors
    full_x, full_y = train_data().tensors
    assert torch.bincount(y).tolist() == [10] * 10
    for c in range(10):
        assert torch.equal(x[y == c], full_x[full_y == c][:10])
    cut = DigitsDataModule(train_split="classifier", val_split="calibration", labelled_per_class=10)
    assert len(cut.val_dataloader().dataset) == len(DigitsDataModule(val_split="calibration").val_dataloader().dataset)
    # several label sets: each set's own classes are cut (compressibility has 2, ink 2)
    x2, y2 = train_data(label_set=["compressibility", "ink"], labelled_per_class=5).tensors
    assert len(x2) == 20 and torch.bincount(y2[:, 0], minlength=3).tolist() == [5, 5, 10]
    with pytest.raises(
        ValueError, match=r"labelled_per_class.*100 labelled images per class, but class \d has \d+ here"
    ):
        train_data(labelled_per_class=100)
    with pytest.raises(ValueError, match=r"labelled_per_class.*give at least 1 image per class, got 0"):
        train_data(labelled_per_class=0)


def test_a_labelled_cut_smaller_than_a_batch_is_one_batch():
    """A cut no larger than one batch (2 compressibility classes x 10 < 64) still trains: every epoch is one batch
    of all its images; a larger set drops only its ragged last batch."""
    from ctrl.datamodules import DigitsDataModule

    def batches(**kwargs):
        data = DigitsDataModule(train_split="classifier", label_set="compressibility", batch_size=64, **kwargs)
        return [len(y) for _, y in data.train_dataloader()]

    assert batches(labelled_per_class=10) == [20]
    assert batches(labelled_per_class=32) == [64]
    full = batches()
    assert full == [64] * (len(full)) and len(full) >= 1


def test_a_training_loader_keeps_one_batch_per_process():
    """Under DDP each process gets ceil(N / world) images and keeps drop_last: a share no larger than one batch is
    one batch, a larger share drops only its ragged end."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from ctrl.datamodules.loaders import training_loader

    def drops(n, batch, world):
        data = TensorDataset(torch.zeros(n))
        return training_loader(data, batch, SimpleNamespace(world_size=world)).drop_last

    assert not drops(60, 32, 2)  # 30 per process: dropping would leave none
    assert drops(100, 32, 2)  # 50 per process: one batch of 32, the ragged 18 dropped
    assert not drops(32, 32, 1) and drops(33, 32, 1)
    assert not training_loader(TensorDataset(torch.zeros(20)), 32).drop_last


def test_a_classifier_learns_from_an_image_folder(tmp_path):
    """ClassifierTraining on a user's folder runs to the end: trained, calibrated on the held-out images (the
    folder's one held-out set also reports), and written."""
    from PIL import Image

    from ctrl.classifier import load_classifier
    from ctrl.cli import console

    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.new("L", (16, 16), color=20 * i).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(12)))
    data = {
        "class_path": "ctrl.datamodules.ImageFolderDataModule",
        "init_args": {
            "root": str(tmp_path / "images"),
            "labels_csv": str(tmp_path / "labels.csv"),
            "num_labels": 2,
            "val_fraction": 0.25,
            "batch_size": 4,
        },
    }
    out = tmp_path / "classifier.safetensors"
    config = Path(__file__).resolve().parents[1] / "configs" / "digits" / "classifier.yaml"
    console(
        ["fit", "--config", str(config), "--data", json.dumps(data), "--model.num_labels", "2"]
        + ["--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        + ["--trainer.default_root_dir", str(tmp_path / "run"), "--model.export_path", str(out)]
    )
    net, temperature = load_classifier(out)
    assert net.config["num_labels"] == 2 and temperature > 0
