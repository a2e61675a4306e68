"""The pretraining module's conditional mode (the classifier-free guidance baseline's model): it starts as the
pretrained model exactly, learns its labels from labelled data with label dropout, exports what the
sampler loads, and refuses data and settings that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from ctrl.conditions import condition_codes
from ctrl.datamodules import DigitsDataModule
from ctrl.datamodules.digits_data import digits_split
from ctrl.datamodules.labelsets import NUM_CLASSES, offline_conditions, true_labels
from ctrl.inference_time import ClassifierFreeGuidance
from ctrl.policy import UNetPolicy
from ctrl.policy.unet import load_pretrained_unet
from ctrl.pretrain import DiffusionPretraining, load_conditional_unet


def _fit(module, images, labels, steps: int, tmp_path):
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True, drop_last=True)
    trainer = quiet_trainer(tmp_path, steps)
    trainer.fit(module, loader)


def test_condition_codes_number_every_label_tuple_once():
    sizes = [4, 2]
    tuples = torch.cartesian_prod(torch.arange(5), torch.arange(3))
    codes = condition_codes(tuples, sizes)
    assert sorted(codes.tolist()) == list(range(15))
    assert int(condition_codes(torch.tensor([[4, 2]]), sizes)) == 14  # all null: the last row


def test_conditional_model_starts_as_the_pretrained_one(tiny_pretrained):
    module = DiffusionPretraining(init_from=tiny_pretrained, num_labels=[3, 2])
    pretrained, _ = load_pretrained_unet(tiny_pretrained)
    x, t = torch.randn(12, 1, 8, 8), torch.tensor(500)
    codes = torch.arange(12)
    with torch.no_grad():
        torch.testing.assert_close(module.unet(x, t, class_labels=codes).sample, pretrained(x, t).sample)


def test_conditional_model_learns_its_labels(tiny_pretrained, tmp_path):
    """Two labels, dark and bright images: after a short fine-tune with label dropout, classifier-free
    guidance through the exported directory (what the benchmark loads) gives dark images for label 0 and
    bright ones for label 1, far above the unconditional branch (scale 0), which ignores the label."""
    torch.manual_seed(0)
    labels = torch.arange(2).repeat(128)
    images = (labels.float() * 1.4 - 0.7).view(-1, 1, 1, 1) + 0.05 * torch.randn(256, 1, 8, 8)
    module = DiffusionPretraining(
        init_from=tiny_pretrained,
        num_labels=2,
        label_dropout=0.2,
        lr=3e-3,
        embedding_lr=0.1,
        warmup_steps=5,
        ema_decay=0.9,
        export_dir=str(tmp_path / "model"),
    )
    _fit(module, images, labels, 200, tmp_path)
    assert json.loads((tmp_path / "model" / "labels.json").read_text()) == {"num_labels": [2]}
    policy = UNetPolicy(pretrained=tiny_pretrained, num_labels=2)
    policy.scheduler.register_to_config(clip_sample=True)  # a 200-step tiny model's x0_hat at t=999 needs clipping
    y = torch.arange(2).repeat(32)

    def accuracy(scale):
        out = ClassifierFreeGuidance(pretrained=str(tmp_path / "model"), scale=scale).sample(
            policy, None, y, torch.arange(64), 10
        )
        return float(((out.samples.mean((1, 2, 3)) > 0).long() == y).float().mean())

    guided, unconditional = accuracy(4.0), accuracy(0.0)
    assert guided >= 0.75 and guided >= unconditional + 0.15, (guided, unconditional)
    unet, _, sizes = load_conditional_unet(tmp_path / "model")
    assert sizes == [2] and unet.config.num_class_embeds == 3


def test_offline_conditions_carry_one_label_each():
    images, labels = offline_conditions(["compressibility", "ink"], "classifier")
    null = torch.tensor([NUM_CLASSES["compressibility"], NUM_CLASSES["ink"]])
    known = labels != null
    assert labels.shape == (len(images), 2) and (known.sum(1) == 1).all()  # exactly one label set's label each
    # compressibility's half leaves out the images in its margin (no class); ink labels its whole half
    classed = int((true_labels("compressibility", digits_split("classifier")[0][::2]) < 2).sum())
    assert 100 < classed < 175 and known[:, 0].sum() == classed and known[:, 1].sum() == 175
    assert DigitsDataModule(label_set=["compressibility", "ink"]).num_labels == [2, 2]


def test_bad_conditional_settings_and_data_are_refused(tiny_pretrained, tmp_path):
    with pytest.raises(ValueError, match=r"^DiffusionPretraining\.num_labels: give a label-set size >= 1"):
        DiffusionPretraining(num_labels=0)
    with pytest.raises(ValueError, match=r"^DiffusionPretraining\.label_dropout: must lie in \[0, 1\)"):
        DiffusionPretraining(num_labels=2, label_dropout=1.0)
    with pytest.raises(ValueError, match=r"^DiffusionPretraining\.init_from: no model directory"):
        DiffusionPretraining(init_from=str(tmp_path / "missing"), num_labels=2)
    with pytest.raises(ValueError, match=r"^DiffusionPretraining\.objective: 'flow_matching', but .* is a ddpm model"):
        DiffusionPretraining(init_from=tiny_pretrained, objective="flow_matching", num_labels=2)
    module = DiffusionPretraining(init_from=tiny_pretrained, num_labels=[2, 2])
    with pytest.raises(ValueError, match="1 label set.*model.num_labels has 2"):
        _fit(module, torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long), 1, tmp_path)
    with pytest.raises(ValueError, match=r"^ClassifierFreeGuidance\.pretrained: '.*' holds no conditional model"):
        ClassifierFreeGuidance(pretrained=tiny_pretrained)


def test_classifier_free_guidance_refusals_name_the_setting(tiny_pretrained, tmp_path):
    with pytest.raises(ValueError, match="^ClassifierFreeGuidance.scale: must be >= 0, got -1"):
        ClassifierFreeGuidance(scale=-1)
    with pytest.raises(ValueError, match="^ClassifierFreeGuidance.pretrained: no conditional model to sample"):
        ClassifierFreeGuidance().sample(
            UNetPolicy(pretrained=tiny_pretrained, num_labels=2),
            None,
            torch.zeros(2, dtype=torch.long),
            torch.arange(2),
            3,
        )
    # a conditional model of [2, 2] label sets for a task of 3 labels; then one with another noise schedule
    module = DiffusionPretraining(init_from=tiny_pretrained, num_labels=[2, 2])
    module.export(tmp_path / "model")
    policy = UNetPolicy(pretrained=tiny_pretrained, num_labels=3)
    y, seeds = torch.zeros(2, dtype=torch.long), torch.arange(2)
    with pytest.raises(ValueError, match=r"label sets of sizes \[2, 2\] \(4 conditions\) but the task has 3"):
        ClassifierFreeGuidance(pretrained=str(tmp_path / "model")).sample(policy, None, y, seeds, 3)
    module.scheduler.register_to_config(beta_end=0.03)
    from diffusers import DDPMScheduler

    DDPMScheduler.from_config(module.scheduler.config).save_pretrained(tmp_path / "model" / "scheduler")
    with pytest.raises(ValueError, match="noise schedule differs from the pretrained model's"):
        ClassifierFreeGuidance(pretrained=str(tmp_path / "model")).sample(
            UNetPolicy(pretrained=tiny_pretrained, num_labels=4), None, y, seeds, 3
        )


def test_conditional_data_refusals(tiny_pretrained, tmp_path):
    with pytest.raises(ValueError, match=r"^give distinct label sets, got \['ink', 'ink'\]"):
        offline_conditions(["ink", "ink"], "classifier")
    with pytest.raises(
        ValueError, match=r"^DigitsDataModule\.label_set: give distinct label sets, got \['ink', 'ink'\]"
    ):
        DigitsDataModule(label_set=["ink", "ink"])
    module = DiffusionPretraining(init_from=tiny_pretrained, num_labels=2)
    loader = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8)), batch_size=32)
    trainer = quiet_trainer(tmp_path, 1)
    with pytest.raises(ValueError, match="model.num_labels is set but the data has no labels"):
        trainer.fit(module, loader)


def test_flow_matching_pretraining_learns_the_data_and_exports_a_flow_model(tmp_path):
    """objective flow_matching: a tiny UNet fitted to images of mean 0.5 exports a FlowMatchEulerDiscreteScheduler
    beside it; UNetPolicy loads it and ctrl's Euler ODE and its stochastic chain both sample that mean (the
    untrained network samples about 0)."""
    from ctrl.sampling import is_flow_scheduler, sample

    torch.manual_seed(0)
    images = 0.5 + 0.1 * torch.randn(256, 1, 8, 8)
    architecture = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1)
    architecture.update(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    module = DiffusionPretraining(objective="flow_matching", warmup_steps=5, ema_decay=0.9, **architecture)
    module.hparams.export_dir = str(tmp_path / "flow")
    _fit(module, images, torch.zeros(256, dtype=torch.long), 150, tmp_path)
    policy = UNetPolicy(pretrained=str(tmp_path / "flow"), num_labels=1, lora_rank=2)
    assert is_flow_scheduler(policy.scheduler)
    null = torch.full((64,), policy.null_label)
    for eta in (0.0, 0.7):
        x = sample(policy, null, 10, eta, generator=torch.Generator().manual_seed(0)).samples
        assert abs(float(x.mean()) - 0.5) < 0.1, (eta, float(x.mean()))
