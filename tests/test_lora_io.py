"""LoRA in and out on the tiny Stable Diffusion pipeline: ExportLora during and at the end of a run, ``ctrl export``
from a checkpoint, ``init_lora`` starting a policy from an export (the same eps and samples as the trained policy),
and the inputs each of them refuses in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import error_line, randomize_lora, tiny_sd_args
from safetensors.torch import load_file

from ctrl.callbacks import export_atomically
from ctrl.cli import console
from ctrl.commands import main
from ctrl.errors import SettingError
from ctrl.policy import StableDiffusionPolicy
from ctrl.policy.adapters import LORA_WEIGHTS
from ctrl.sampling import sample, seeded_noise
from ctrl.testing import make_tiny_sd

FILES = ["class_embedding.safetensors", LORA_WEIGHTS]
CALLBACKS = [
    {"class_path": "ctrl.callbacks.ResumableCheckpoint", "init_args": {"every_n_train_steps": 10}},
    {"class_path": "ctrl.callbacks.ExportLora", "init_args": {"every_n_steps": 2}},
]


def _args(root, tiny_sd, tiny_rgb_classifier, *extra) -> list[str]:
    """The conditional-compressibility config (LoRA rank 4 and a class embedding, DirectBackprop) for 4 rollouts of
    one optimizer step each, with a LoRA export every 2 steps."""
    reward = ["--model.reward.path", tiny_rgb_classifier]
    more = ["--data.batches_per_epoch", "4", "--trainer.callbacks", json.dumps(CALLBACKS), *extra]
    return tiny_sd_args("compressibility", root, tiny_sd, reward, *more)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd, tiny_rgb_classifier):
    """A 4-step ``ctrl fit``: its folder, its arguments (without the subcommand) and the trained policy."""
    root = tmp_path_factory.mktemp("lora-run")
    args = _args(root, tiny_sd, tiny_rgb_classifier)
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 4
    return root, args, cli.model.policy


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(folder / name)) for name in FILES}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def test_export_every_n_steps_writes_a_folder_per_step_and_the_final_one(run):
    root, _, policy = run
    lora = root / "lora"
    assert sorted(p.name for p in lora.iterdir()) == [*FILES, "step_2", "step_4"]  # no temporary folder left
    assert not list(root.glob(".*partial"))
    for step in ("step_2", "step_4"):
        assert sorted(p.name for p in (lora / step).iterdir()) == FILES
    final, step_2, step_4 = _tensors(lora), _tensors(lora / "step_2"), _tensors(lora / "step_4")
    _assert_equal(step_4, final)  # nothing trained after the 4th step
    # the folder of step 2 was written during the run: the adapter moved in steps 3 and 4
    assert any(not torch.equal(step_2[LORA_WEIGHTS][k], final[LORA_WEIGHTS][k]) for k in final[LORA_WEIGHTS])
    # the final export is the trained policy's adapter
    lora_b = {n: p for n, p in policy.unet.named_parameters() if "lora_B" in n}
    assert lora_b and max(float(p.abs().max()) for p in lora_b.values()) > 0
    assert torch.equal(final["class_embedding.safetensors"]["weight"], policy.unet.class_embedding.weight.detach())


def test_ctrl_export_of_the_last_checkpoint_is_the_callbacks_final_export(run, tmp_path, capsys):
    root, args, _ = run
    last = root / "checkpoints" / "last.ckpt"
    console(["export", *args, "--ckpt_path", str(last), "--out", str(tmp_path / "exported")])
    assert f"to {tmp_path / 'exported'} (diffusers: pipe.load_lora_weights)" in capsys.readouterr().out
    _assert_equal(_tensors(tmp_path / "exported"), _tensors(root / "lora"))
    # by default beside the checkpoint; only the policy is built: the reward's weights need not be there
    console(["export", *args, "--ckpt_path", str(last), "--model.reward.path", str(tmp_path / "absent.safetensors")])
    _assert_equal(_tensors(root / "checkpoints" / "last_lora"), _tensors(root / "lora"))


def test_a_policy_started_from_the_export_is_the_trained_policy(run, tiny_sd, tiny_rgb_classifier):
    """init_lora: the same eps (every condition, adapters and class embedding) and the same samples for the same
    seeds as the policy that was trained, which is not the pretrained model."""
    root, args, trained = run
    policy = main([*args, "--model.policy.init_lora", str(root / "lora")], run=False).model.policy
    labels = torch.arange(policy.num_labels)  # 2 prompts x 4 classes
    x, t = (
        torch.randn(len(labels), *policy.sample_shape, generator=torch.Generator().manual_seed(0)),
        torch.tensor(700),
    )
    with torch.no_grad():
        eps, eps_pre = policy.predict(x, t, labels)
        eps_trained, eps_pre_trained = trained.predict(x, t, labels)
        assert torch.equal(eps, eps_trained) and torch.equal(eps_pre, eps_pre_trained)
        assert (eps - eps_pre).abs().max() > 1e-4  # the LoRA and the embedding matter
        noise = seeded_noise(torch.arange(len(labels)) + 1234, 3, policy.sample_shape)
        ours, theirs = sample(policy, labels, 3, noise=noise), sample(trained, labels, 3, noise=noise)
    assert torch.equal(ours.latents, theirs.latents) and torch.equal(ours.kl, theirs.kl)


@pytest.fixture(scope="module")
def other_base_model(tmp_path_factory) -> str:
    """A tiny pipeline whose cross-attention is wider: the same layer names, other shapes."""
    return make_tiny_sd(
        tmp_path_factory.mktemp("other-sd"), unet={"cross_attention_dim": 32}, text={"hidden_size": 32}
    )


INIT_LORA_REFUSALS = {
    "missing directory": ({"init_lora": "{root}/nowhere"}, r"no LoRA directory at '.*nowhere'"),
    "a folder without a LoRA": ({"init_lora": "{root}/checkpoints"}, r"'.*checkpoints' holds no LoRA that diffusers"),
    "another rank": ({"lora_rank": 2}, r"'.*lora' holds a LoRA of rank 4 but lora_rank is 2; set lora_rank: 4"),
    "another alpha": ({"lora_alpha": 8.0}, r"'.*lora' was saved with lora_alpha 4 but lora_alpha is 8"),
    "other target modules": (
        {"lora_target_modules": ["to_q", "to_k", "to_v"]},
        r"'.*lora' does not fit this UNet's LoRA \(\d+ of its layers are not in this adapter \(e.g. '.*to_out.0.lora_A"
        r".*other lora_target_modules than \['to_k', 'to_q', 'to_v'\]",
    ),
    "another base model": (
        {"pretrained": "{other}"},
        r"'.*lora' does not fit this UNet's LoRA \(\d+ have another shape \(e.g. '.*attn2.to_k.lora_A.weight': "
        r"\[4, 16\], here \[4, 32\]\)\): it was trained on another base model",
    ),
}


@pytest.mark.parametrize("case", list(INIT_LORA_REFUSALS))
def test_init_lora_refuses_what_does_not_fit_in_one_line(case, run, tiny_sd, other_base_model):
    root, _, _ = run
    changes, message = INIT_LORA_REFUSALS[case]
    settings = dict(pretrained=tiny_sd, prompts=["a cat", "a dog"], num_classes=4, lora_rank=4)
    settings.update(init_lora=str(root / "lora"))
    settings.update(
        {k: v.format(root=root, other=other_base_model) if isinstance(v, str) else v for k, v in changes.items()}
    )
    with pytest.raises(SettingError) as info:
        StableDiffusionPolicy(**settings)
    assert info.value.key == "init_lora" and "\n" not in str(info.value)
    assert re.match(f"StableDiffusionPolicy.init_lora: {message}", str(info.value)), str(info.value)


def test_through_the_command_the_refusal_names_the_setting_in_the_config(run, tmp_path, monkeypatch, capsys):
    root, args, _ = run
    argv = [
        "fit",
        *args,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.policy.init_lora",
        str(tmp_path / "no"),
    ]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(r"ctrl: error: model\.policy\.init_lora: no LoRA directory at '.*no'", line), line
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_export_refuses_a_missing_checkpoint_and_a_policy_without_export(run, tmp_path, monkeypatch, capsys):
    root, args, _ = run
    line = error_line(["export", *args, "--ckpt_path", str(tmp_path / "gone.ckpt")], monkeypatch, capsys)
    assert re.match(r"ctrl: error: --ckpt_path: no checkpoint at '.*gone\.ckpt'", line), line
    line = error_line(["export", *args], monkeypatch, capsys)
    assert line.startswith("ctrl: error: --ckpt_path: give the checkpoint to export"), line
    digits = Path(__file__).resolve().parents[1] / "configs" / "digits" / "control.yaml"
    argv = ["export", "--config", str(digits), "--ckpt_path", str(root / "checkpoints" / "last.ckpt")]
    line = error_line(argv, monkeypatch, capsys)
    assert line.startswith("ctrl: error: model.policy: ctrl.policy.UNetPolicy has no diffusers export;"), line
    assert not list(tmp_path.iterdir())


def test_an_interrupted_export_leaves_the_previous_one_whole(tmp_path):
    class Interrupted:
        """A policy whose export is killed halfway through writing the LoRA."""

        def export(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / LORA_WEIGHTS).write_bytes(b"half a LoRA")
            raise KeyboardInterrupt

    class Whole:
        def export(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / LORA_WEIGHTS).write_bytes(b"a LoRA")
            (Path(directory) / "class_embedding.safetensors").write_bytes(b"an embedding")

    lora = tmp_path / "lora"
    assert export_atomically(Whole(), lora) == ["class_embedding.safetensors", LORA_WEIGHTS]
    with pytest.raises(KeyboardInterrupt):
        export_atomically(Interrupted(), lora)
    with pytest.raises(KeyboardInterrupt):
        export_atomically(Interrupted(), tmp_path / "step_2")
    assert (lora / LORA_WEIGHTS).read_bytes() == b"a LoRA" and not (tmp_path / "step_2").exists()
    export_atomically(Whole(), lora)  # the next export clears what the killed one left
    export_atomically(Whole(), tmp_path / "step_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "step_2"]
    assert (tmp_path / "step_2" / LORA_WEIGHTS).read_bytes() == b"a LoRA"


def test_init_lora_takes_the_loras_alpha_when_lora_alpha_is_unset(tiny_sd, tmp_path):
    """A LoRA saved with alpha != rank (diffusers keeps the alpha in the file's metadata) scales the same after
    init_lora as in the policy that saved it."""
    saved = StableDiffusionPolicy(tiny_sd, prompts=["a cat"], lora_rank=2, lora_alpha=8)
    randomize_lora(saved.unet, seed=0)
    saved.export(tmp_path / "lora")
    started = StableDiffusionPolicy(tiny_sd, prompts=["a cat"], lora_rank=2, init_lora=str(tmp_path / "lora"))
    assert started.lora_config.lora_alpha == 8
    x, t, labels = torch.randn(1, *saved.sample_shape), torch.tensor(500), torch.tensor([0])
    with torch.no_grad():
        assert torch.equal(started.predict(x, t, labels)[0], saved.predict(x, t, labels)[0])
