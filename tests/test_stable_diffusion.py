"""Stable Diffusion scale on tiny random components built locally (conftest.make_tiny_sd): every plugin
trains through the sd15 configs, the exported LoRA samples the same images in a plain diffusers
pipeline, checkpoints hold the trainable weights only, and the conditions, rewards and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize_lora, tiny_sd_args

from ctrl.cli import console
from ctrl.commands import main
from ctrl.policy import StableDiffusionPolicy
from ctrl.sampling import sample, seeded_noise


def _rewards(config, tiny_rgb_classifier, tiny_aesthetic) -> list[str]:
    if config == "compressibility":
        return ["--model.reward.path", tiny_rgb_classifier]
    clip, mlp = tiny_aesthetic
    return ["--model.reward.clip_model", clip, "--model.reward.mlp_path", mlp]


PLUGIN_RUNS = {
    # plugin: (config, extra arguments)
    "DirectBackprop": ("compressibility", []),  # class embedding + LoRA, random truncation
    "PPO": ("aesthetic_ddpo", []),
    "ContinuousTimePG": ("continuous", []),
    "RAFT": ("aesthetic_ddpo", ["--model.algorithm", "RAFT", "--model.algorithm.keep_fraction", "0.5"]),
    "PPO+JPEG": ("aesthetic_ddpo", ["--model.reward", "ctrl.rewards.JpegCompressibility"]),
    # as shipped: frozen weights in bfloat16 under bf16 autocast, LoRA and class embedding in float32
    "DirectBackprop+bf16": (
        "compressibility",
        ["--model.policy.dtype", "bfloat16", "--trainer.precision", "bf16-mixed"],
    ),
    "PPO+bf16": ("aesthetic_ddpo", ["--model.policy.dtype", "bfloat16", "--trainer.precision", "bf16-mixed"]),
}


@pytest.mark.parametrize("plugin", list(PLUGIN_RUNS))
def test_two_training_steps_per_plugin(plugin, tmp_path, tiny_sd, tiny_rgb_classifier, tiny_aesthetic):
    config, extra = PLUGIN_RUNS[plugin]
    reward = [] if "JPEG" in plugin else _rewards(config, tiny_rgb_classifier, tiny_aesthetic)
    cli = main(["fit", *tiny_sd_args(config, tmp_path, tiny_sd, reward, *extra)])
    module = cli.model
    assert type(module.algorithm).__name__ == plugin.split("+")[0]
    assert cli.trainer.global_step >= 2
    # the adapter (and class embedding) moved away from their zero start, and the chain's KL with them
    lora_b = [p for n, p in module.policy.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b)
    assert max(float(p.detach().abs().max()) for p in lora_b) > 0
    if config == "compressibility":
        assert float(module.policy.unet.class_embedding.weight[:-1].abs().max()) > 0
        assert float(module.policy.unet.class_embedding.weight[-1].abs().max()) == 0  # the null class stays zero
    assert module.last_metrics["kl"] > 0 and torch.isfinite(torch.tensor(module.last_metrics["reward"]))
    # the checkpoint holds the trainable weights only (the frozen pipeline comes from `pretrained`)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    trainable = module.trainable_names()
    assert trainable and all("lora_" in n or "class_embedding" in n or "algorithm.value" in n for n in trainable)
    assert set(ckpt["state_dict"]) == trainable
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_restores_the_trainable_weights(tmp_path, tiny_sd, tiny_aesthetic):
    """A checkpoint without the frozen weights resumes: ``validate`` from it reproduces the trained policy."""
    args = tiny_sd_args("alignprop", tmp_path, tiny_sd, _rewards("alignprop", None, tiny_aesthetic))
    trained = main(["fit", *args]).model
    restored = main(["validate", *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")]).model
    for name, p in trained.named_parameters():
        assert torch.equal(p, dict(restored.named_parameters())[name]), name


def test_predict_writes_a_grid_of_decoded_images(tmp_path, tiny_sd, tiny_rgb_classifier):
    """``ctrl predict`` from a trained checkpoint writes RGB images (decoded by the VAE), a row per condition."""
    from PIL import Image

    args = tiny_sd_args("compressibility", tmp_path, tiny_sd, _rewards("compressibility", tiny_rgb_classifier, None))
    main(["fit", *args])
    grid = tmp_path / "grid.png"
    callbacks = json.dumps(
        [{"class_path": "ctrl.callbacks.PredictionGrid", "init_args": {"path": str(grid), "scale": 1}}]
    )
    main(
        [
            "predict",
            *args,
            "--ckpt_path",
            str(tmp_path / "checkpoints" / "last.ckpt"),
            "--trainer.callbacks",
            callbacks,
            "--data.predict_labels",
            "[0, 1, 2, 3]",
            "--data.predict_per_label",
            "2",
        ]
    )
    image = Image.open(grid)
    assert image.mode == "RGB" and image.size == (2 * 18, 4 * 18)  # 16x16 images with a 1-pixel frame


def _pipeline(directory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(directory, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(directory, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(directory, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(directory, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_exported_lora_samples_the_same_images_in_diffusers(tmp_path, tiny_sd):
    """The export round trip: a LoRA (alpha != rank, random non-zero weights) written by ``export`` and
    loaded by ``StableDiffusionPipeline.load_lora_weights`` gives, for the same seed, scheduler (DDIM,
    eta 1), steps and control scale, the images that ctrl's own sampler gives."""
    prompts, steps, scale, seed = ["a cat", "a red dog"], 4, 3.0, 1234
    policy = StableDiffusionPolicy(tiny_sd, prompts=prompts, guidance_scale=scale, lora_rank=2, lora_alpha=4)
    randomize_lora(policy.unet, seed=0)
    policy.export(tmp_path / "lora")

    pipe = _pipeline(tiny_sd)

    def images():
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            prompts[1], num_inference_steps=steps, guidance_scale=scale, eta=1.0, output_type="pt", generator=generator
        ).images

    base = images()
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = images()

    # the UNet itself: diffusers' with the loaded LoRA and the policy's with its adapters on
    x, t = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1)), torch.tensor(700)
    with torch.no_grad():
        policy.predict(x, t, torch.tensor([0, 1]))  # leaves the adapters on
        own = policy.unet(x, t, encoder_hidden_states=policy.prompt_embeds).sample
        loaded = pipe.unet(x, t, encoder_hidden_states=policy.prompt_embeds).sample
        pipe.disable_lora()
        plain = pipe.unet(x, t, encoder_hidden_states=policy.prompt_embeds).sample
        pipe.enable_lora()
    torch.testing.assert_close(loaded, own, atol=1e-6, rtol=0)
    assert (loaded - plain).abs().max() > 1e-3

    labels = torch.tensor([1])  # condition 1: the second prompt
    noise = seeded_noise(torch.tensor([seed]), steps, policy.sample_shape)
    with torch.no_grad():
        ours = (policy.decode(sample(policy, labels, steps, 1.0, noise=noise).samples) + 1) / 2
        pretrained = (
            policy.decode(sample(policy, labels, steps, 1.0, noise=noise, control_scale=0.0).samples) + 1
        ) / 2
    assert (theirs - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(pretrained, base, atol=1e-4, rtol=0)


def test_conditions_are_prompt_class_pairs(tiny_sd):
    policy = StableDiffusionPolicy(tiny_sd, prompts=["a cat", "a dog", "a cow"], num_classes=4, lora_rank=0)
    assert policy.num_labels == 12 and policy.num_reward_labels == 4
    labels = torch.tensor([0, 5, 11])
    assert policy.prompt_index(labels).tolist() == [0, 1, 2]
    assert policy.reward_labels(labels).tolist() == [0, 1, 3]
    assert policy.condition_name(5) == "a dog | class 1"
    # different prompts are encoded differently; the policy starts as the pretrained model exactly
    assert (policy.prompt_embeds[0] - policy.prompt_embeds[1]).abs().max() > 0
    x = torch.randn(3, *policy.sample_shape)
    eps, eps_pre = policy.predict(x, torch.tensor(500), labels)
    torch.testing.assert_close(eps, eps_pre)


def test_lora_init_gaussian_starts_a_as_trl_does(tiny_sd):
    """``lora_init: gaussian``: A ~ N(0, 1/rank^2) as trl's trainers start it (peft's default is Kaiming-uniform
    within 1/sqrt(fan_in), a different scale of the first updates); B is zero either way, so the policy starts
    as the pretrained model."""
    rank = 4
    for init in ("default", "gaussian"):
        torch.manual_seed(0)  # std within 5% of 1/rank: a fixed draw, not a chance one
        policy = StableDiffusionPolicy(tiny_sd, prompts=["a cat"], lora_rank=rank, lora_init=init)
        factors = dict(policy.unet.named_parameters())
        a = [p.detach() for n, p in factors.items() if "lora_A." in n]
        assert all(float(p.abs().max()) == 0 for n, p in factors.items() if "lora_B." in n) and a
        if init == "gaussian":
            assert abs(float(torch.cat([w.flatten() for w in a]).std()) * rank - 1) < 0.05
            assert any(float(w.abs().max()) > w.shape[1] ** -0.5 for w in a)  # outside Kaiming's bound
        else:
            assert all(float(w.abs().max()) <= w.shape[1] ** -0.5 for w in a)
    with pytest.raises(ValueError, match=r"^StableDiffusionPolicy\.lora_init: 'pissa' is not one of \['default', "):
        StableDiffusionPolicy(tiny_sd, prompts=["a cat"], lora_init="pissa")


def test_guidance_branches_get_the_right_prompt_class_and_adapter(tiny_sd):
    """eps against classifier-free guidance written out by hand: the pretrained model (adapters off, null
    class) and the policy (adapters on; the conditional branch with the chain's prompt and class, the
    unconditional one with the empty prompt and the null class), with a non-zero LoRA and embedding."""
    scale, control_scale = 4.0, 0.7
    policy = StableDiffusionPolicy(
        tiny_sd, prompts=["a cat", "a dog"], num_classes=3, guidance_scale=scale, lora_rank=2
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_" in name or "class_embedding" in name:
                p.normal_(0, 0.5)
        policy.unet.class_embedding.weight[-1] = 0
    labels = torch.tensor([5, 0, 4])  # (prompt 1, class 2), (0, 0), (1, 1)
    prompts, classes = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 1])
    null = torch.full_like(classes, 3)
    x, t = torch.randn(3, *policy.sample_shape), torch.tensor(600)
    empty = policy.empty_embeds.expand(3, -1, -1)

    def unet(text, cls, adapters):
        policy.unet.enable_adapters() if adapters else policy.unet.disable_adapters()
        return policy.unet(x, t, encoder_hidden_states=text, class_labels=cls).sample

    with torch.no_grad():
        u_pre, c_pre = unet(empty, null, False), unet(policy.prompt_embeds[prompts], null, False)
        u_pol, c_pol = unet(empty, null, True), unet(policy.prompt_embeds[prompts], classes, True)
        eps, eps_pre = policy.predict(x, t, labels, control_scale)
    expected_pre = u_pre + scale * (c_pre - u_pre)
    expected_policy = u_pol + scale * (c_pol - u_pol)
    torch.testing.assert_close(eps_pre, expected_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        eps, expected_pre + control_scale * (expected_policy - expected_pre), atol=1e-5, rtol=1e-5
    )
    assert (expected_policy - expected_pre).abs().max() > 1e-3  # the control is not trivially zero


def test_prompts_datamodule_draws_groups_of_the_policys_conditions(tmp_path, tiny_sd, tiny_aesthetic):
    args = tiny_sd_args(
        "aesthetic_ddpo",
        tmp_path,
        tiny_sd,
        _rewards("aesthetic_ddpo", None, tiny_aesthetic),
        "--data.batch_size",
        "8",
        "--data.group_size",
        "4",
    )
    cli = main(args, run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.datamodule = cli.datamodule
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.setup("fit")
    assert cli.datamodule.num_labels == 2  # the two prompts
    labels, seeds = next(iter(cli.datamodule.train_dataloader()))
    assert labels.view(2, 4).unique(dim=1).shape[1] == 1  # each drawn prompt fills a group of 4 chains
    assert len(set(seeds.tolist())) == 8  # ...with its own noise per chain


def test_jpeg_reward_ranks_flat_images_as_compressible():
    from ctrl.rewards import JpegCompressibility

    flat = torch.zeros(1, 3, 64, 64)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    compress, incompress = JpegCompressibility(), JpegCompressibility(incompressible=True)
    assert compress(flat) > compress(noisy)
    assert incompress(noisy) > incompress(flat)
    torch.testing.assert_close(compress(noisy), -incompress(noisy))


def test_aesthetic_reward_is_differentiable_and_loads_the_released_layout(tiny_aesthetic):
    from ctrl.rewards import AestheticScore

    clip, mlp = tiny_aesthetic
    reward = AestheticScore(clip, mlp)
    assert set(reward.mlp.state_dict()) == {f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias")}
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    scores = reward(images)
    scores.sum().backward()
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert images.grad.abs().sum() > 0


def _bad_pipeline(tmp_path, tiny_sd):
    broken = tmp_path / "no-vae"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    return str(broken)


def _v_prediction_pipeline(tmp_path, tiny_sd):
    changed = tmp_path / "v-pred"
    shutil.copytree(tiny_sd, changed)
    config = changed / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return str(changed)


BAD_INPUTS = {
    "pipeline missing a component": (
        lambda tmp, sd: ["--model.policy.pretrained", _bad_pipeline(tmp, sd)],
        "model.policy.pretrained: '.*no-vae' has no vae/",
    ),
    "v-prediction pipeline": (
        lambda tmp, sd: ["--model.policy.pretrained", _v_prediction_pipeline(tmp, sd)],
        "model.policy.pretrained: '.*v-pred' predicts 'v_prediction'",
    ),
    "LoRA target that is not in the UNet": (
        lambda tmp, sd: ["--model.policy.lora_target_modules", '["to_q", "attn_qq"]'],
        r"model.policy.lora_target_modules: \['attn_qq'\] match no module of the UNet",
    ),
    "empty prompt file": (
        lambda tmp, sd: (
            (tmp / "empty.txt").write_text("\n# nothing\n") and ["--model.policy.prompts", str(tmp / "empty.txt")]
        ),
        "model.policy.prompts: '.*empty.txt' holds no prompt",
    ),
    "resolution not divisible by the VAE factor": (
        lambda tmp, sd: ["--model.policy.resolution", "15"],
        "model.policy.resolution: 15 is not divisible by the VAE's downsampling factor 2",
    ),
    "missing aesthetic weights": (
        lambda tmp, sd: ["--model.reward.mlp_path", str(tmp / "absent.pth")],
        "model.reward.mlp_path: no aesthetic MLP weights at",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(case, tmp_path, tiny_sd, tiny_aesthetic, capsys, monkeypatch):
    import re

    make, expected = BAD_INPUTS[case]
    extra = make(tmp_path, tiny_sd)
    args = tiny_sd_args(
        "aesthetic_ddpo", tmp_path / "run", tiny_sd, _rewards("aesthetic_ddpo", None, tiny_aesthetic), *extra
    )
    monkeypatch.setattr("sys.argv", ["ctrl", "fit", *args])
    with pytest.raises(SystemExit) as exit_:
        console()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ctrl: error:")]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert re.match(f"ctrl: error: {expected}", err[0]), err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
