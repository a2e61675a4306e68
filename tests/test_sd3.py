"""Stable Diffusion 3 on a tiny random pipeline built locally (ctrl.testing.make_tiny_sd3): the policy's velocities
are the pipeline's own classifier-free-guided transformer calls, its exported LoRA gives the same velocities (and,
once ctrl's sampler steps flow-matching schedulers, the same images) in a plain diffusers StableDiffusion3Pipeline,
and a pipeline of the other kind given to either Stable Diffusion policy is refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import error_line, randomize_lora, tiny_sd_args

from ctrl.policy import StableDiffusion3Policy

PROMPTS, SCALE = ["a cat", "a red dog"], 3.0


def _pipeline(directory, t5: bool = True):
    from diffusers import StableDiffusion3Pipeline

    without_t5 = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(directory, **without_t5)


def _guided(pipe, x: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The velocity StableDiffusion3Pipeline.__call__ guides with (its noise_pred after guidance) for latents ``x``
    ``[B, ...]`` at timesteps ``t`` ``[B]``, the prompts encoded by the pipeline itself (negative: "")."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device=x.device, do_classifier_free_guidance=True
    )
    v = pipe.transformer(
        hidden_states=torch.cat([x, x]),
        timestep=torch.cat([t, t]),
        encoder_hidden_states=torch.cat([negative, embeds]),
        pooled_projections=torch.cat([negative_pooled, pooled]),
        return_dict=False,
    )[0]
    uncond, conditional = v.chunk(2)
    return uncond + SCALE * (conditional - uncond)


def _inputs(policy, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[n, 16, 8, 8]`` and per-sample timesteps ``[n]`` of the scheduler's own 4-step grid (sigma * 1000)."""
    policy.scheduler.set_timesteps(4)
    x = torch.randn(n, *policy.sample_shape, generator=torch.Generator().manual_seed(seed))
    return x, policy.scheduler.timesteps[torch.arange(n) % 4].float()


@pytest.mark.parametrize("t5", [True, False], ids=["with-t5", "without-t5"])
def test_predict_is_the_pipelines_guided_transformer(tiny_sd3, t5):
    """control_scale 0 is the pipeline's CFG velocity (its own prompt encoding; without T5: zero T5 embeddings, as
    the pipeline with text_encoder_3=None); with a random LoRA control_scale 1 differs, except for the null label,
    and pretrained=False gives the same ``out`` without ``out_pre``."""
    torch.set_num_threads(1)
    policy = StableDiffusion3Policy(tiny_sd3, prompts=PROMPTS, guidance_scale=SCALE, lora_rank=2, use_t5=t5)
    pipe = _pipeline(tiny_sd3, t5)
    labels = torch.tensor([1, 0, policy.null_label])  # the null label samples the pretrained model, first prompt
    x, t = _inputs(policy, len(labels))
    with torch.no_grad():
        expected = _guided(pipe, x, t, ["a red dog", "a cat", "a cat"])
        out, out_pre = policy.predict(x, t, labels, control_scale=0.0)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_pre, expected, atol=1e-5, rtol=1e-5)
        randomize_lora(policy.transformer, seed=0)
        out, out_pre = policy.predict(x, t, labels, control_scale=1.0)
        own, none = policy.predict(x[:2], t[:2], labels[:2], pretrained=False)
    torch.testing.assert_close(out_pre, expected, atol=1e-5, rtol=1e-5)
    assert (out[:2] - out_pre[:2]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the LoRA acts on both prompts...
    assert torch.equal(out[2], out_pre[2])  # ...but not on the null label
    assert none is None
    torch.testing.assert_close(own, out[:2], atol=1e-6, rtol=1e-6)


BOTH_STREAMS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.mark.parametrize("targets", [None, BOTH_STREAMS], ids=["image stream", "both streams"])
def test_exported_lora_gives_the_same_velocity_in_diffusers(targets, tmp_path, tiny_sd3):
    """The export round trip: a LoRA (alpha != rank, random non-zero weights; on the image stream's attention, or on
    both streams' as Flow-GRPO) written by ``export`` and loaded by ``StableDiffusion3Pipeline.load_lora_weights``
    gives the policy's velocity (control_scale 1) with the pipeline's own guidance and prompt encoding; the LoRA
    matters."""
    torch.set_num_threads(1)
    lora = dict(lora_rank=2, lora_target_modules=targets)
    policy = StableDiffusion3Policy(tiny_sd3, prompts=PROMPTS, guidance_scale=SCALE, lora_alpha=4, **lora)
    randomize_lora(policy.transformer, seed=0)
    policy.export(tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    pipe = _pipeline(tiny_sd3)
    labels = torch.tensor([0, 1])
    x, t = _inputs(policy, len(labels))
    with torch.no_grad():
        base = _guided(pipe, x, t, PROMPTS)
        pipe.load_lora_weights(tmp_path / "lora")
        loaded = _guided(pipe, x, t, PROMPTS)
        out, out_pre = policy.predict(x, t, labels, control_scale=1.0)
    torch.testing.assert_close(loaded, out, atol=1e-4, rtol=0)
    torch.testing.assert_close(base, out_pre, atol=1e-4, rtol=0)
    assert (loaded - base).abs().max() > 1e-3
    # and init_lora starts a policy from the export: the same velocities
    started = StableDiffusion3Policy(
        tiny_sd3, prompts=PROMPTS, guidance_scale=SCALE, init_lora=str(tmp_path / "lora"), **lora
    )
    assert started.lora_config.lora_alpha == 4
    with torch.no_grad():
        assert torch.equal(started.predict(x, t, labels)[0], out)


def test_exported_lora_images_match_diffusers(tmp_path, tiny_sd3):
    """End to end (issue 16): ctrl's sampler on the Euler ODE (eta 0) from the same initial latents gives the images
    StableDiffusion3Pipeline gives with the exported LoRA, and without it at control_scale 0.

    Needs ``ctrl.sampling.sample`` to step flow-matching schedulers (velocity prediction): until it does, this test
    fails."""
    from ctrl.sampling import sample, seeded_noise

    torch.set_num_threads(1)
    steps, seed = 4, 1234
    policy = StableDiffusion3Policy(tiny_sd3, prompts=PROMPTS, guidance_scale=SCALE, lora_rank=2, lora_alpha=4)
    randomize_lora(policy.transformer, seed=0)
    policy.export(tmp_path / "lora")
    labels = torch.tensor([1])  # condition 1: the second prompt
    noise = seeded_noise(torch.tensor([seed]), steps, policy.sample_shape)
    with torch.no_grad():
        ours = (policy.decode(sample(policy, labels, num_steps=steps, eta=0.0, noise=noise).samples) + 1) / 2
        pretrained = sample(policy, labels, num_steps=steps, eta=0.0, noise=noise, control_scale=0.0)
        pretrained = (policy.decode(pretrained.samples) + 1) / 2

    pipe = _pipeline(tiny_sd3)

    def images():
        return pipe(
            PROMPTS[1], num_inference_steps=steps, guidance_scale=SCALE, latents=noise[:, 0], output_type="pt"
        ).images

    base = images()
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = images()
    assert (theirs - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(pretrained, base, atol=1e-4, rtol=0)


def test_lora_init_gaussian_starts_the_transformers_lora_as_trl_does(tiny_sd3):
    """The SD3 policy's ``lora_init``: A ~ N(0, 1/rank^2) under "gaussian", B zero; an unknown init refused."""
    rank = 4
    torch.manual_seed(0)  # std within 5% of 1/rank: a fixed draw, not a chance one
    policy = StableDiffusion3Policy(tiny_sd3, prompts=["a cat"], lora_rank=rank, lora_init="gaussian")
    factors = dict(policy.transformer.named_parameters())
    a = torch.cat([p.detach().flatten() for n, p in factors.items() if "lora_A." in n])
    assert abs(float(a.std()) * rank - 1) < 0.05
    assert all(float(p.abs().max()) == 0 for n, p in factors.items() if "lora_B." in n)
    with pytest.raises(ValueError, match=r"^StableDiffusion3Policy\.lora_init: 'olora' is not one of"):
        StableDiffusion3Policy(tiny_sd3, prompts=["a cat"], lora_init="olora")


def test_a_pipeline_of_the_other_kind_is_refused_in_one_line(tmp_path, tiny_sd, tiny_sd3, monkeypatch, capsys):
    """An SD 1.5 directory in configs/sd3/ppo.yaml and an SD3 directory in configs/sd15/aesthetic_ddpo.yaml: one
    ``ctrl: error:`` line naming model.policy.pretrained and the policy to use, before any training."""
    from pathlib import Path

    sd3_config = Path(__file__).resolve().parents[1] / "configs" / "sd3" / "ppo.yaml"
    argv = ["fit", "--config", str(sd3_config), "--trainer.default_root_dir", str(tmp_path / "sd3")]
    argv += ["--trainer.accelerator", "cpu", "--model.policy.pretrained", tiny_sd]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(
        r"ctrl: error: model\.policy\.pretrained: '.*tiny-sd\d*' is not a Stable Diffusion 3 pipeline \(its "
        r"scheduler is DDIMScheduler.*use ctrl\.policy\.StableDiffusionPolicy\.$",
        line,
    ), line

    jpeg = ["--model.reward", "ctrl.rewards.JpegCompressibility"]
    argv = ["fit", *tiny_sd_args("aesthetic_ddpo", tmp_path / "sd15", tiny_sd3, jpeg)]
    line = error_line(argv, monkeypatch, capsys)
    assert re.match(
        r"ctrl: error: model\.policy\.pretrained: '.*tiny-sd3\d*' is a flow-matching pipeline \(its scheduler is "
        r"FlowMatchEulerDiscreteScheduler.*use ctrl\.policy\.StableDiffusion3Policy for it\.$",
        line,
    ), line
    assert not list(tmp_path.rglob("checkpoints"))


def _tiny_sd3_args(config: str, root, pipeline: str, *extra: str) -> list[str]:
    """Arguments of a tiny CPU run of ``configs/sd3/<config>.yaml`` (as conftest.tiny_sd_args for sd15): the tiny
    pipeline in float32 at its own 16 pixels, two prompts, 3 steps, 2 rollouts of 4 chains, no logger."""
    from pathlib import Path

    config_path = Path(__file__).resolve().parents[1] / "configs" / "sd3" / f"{config}.yaml"
    args = ["--config", str(config_path), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_epochs", "1"]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--model.policy.pretrained", pipeline, "--model.policy.dtype", "float32", "--model.policy.resolution"]
    args += ["16", "--model.policy.max_sequence_length", "32", "--model.policy.prompts", '["a cat", "a dog"]']
    args += ["--model.num_steps", "3", "--model.eval_num_steps", "3", "--data.batch_size", "4"]
    args += ["--data.group_size", "2", "--data.batches_per_epoch", "2", "--data.eval_per_label", "1"]
    return [*args, *extra]


CONFIGS = [
    ("direct", []),
    ("ppo", []),
    ("ppo", ["--model.algorithm", "RAFT", "--model.algorithm.alpha", "1.0"]),  # RAFT has no sd3 config of its own
    ("continuous", []),
    ("grpo_compressibility", []),
    ("grpo_pickscore", []),
]


@pytest.mark.parametrize("config, extra", CONFIGS, ids=["direct", "ppo", "raft", "continuous", "grpo", "grpo_pick"])
def test_two_training_steps_per_config(config, extra, tmp_path, tiny_sd3, tiny_aesthetic, tiny_clip):
    """configs/sd3/*.yaml train every plugin on the tiny pipeline: the LoRA moves away from zero, the checkpoint
    holds only its weights, and ExportLora writes a LoRA that StableDiffusion3Policy starts from (the trained
    velocities)."""
    from ctrl.commands import main

    torch.set_num_threads(1)
    text = (Path(__file__).resolve().parents[1] / "configs" / "sd3" / f"{config}.yaml").read_text()
    clip, mlp = tiny_aesthetic
    reward = ["--model.reward.clip_model", clip, "--model.reward.mlp_path", mlp] if "AestheticScore" in text else []
    if "PickScore" in text:
        reward = ["--model.reward.model", tiny_clip, "--model.reward.processor", tiny_clip]
    cli = main(["fit", *_tiny_sd3_args(config, tmp_path, tiny_sd3, *reward, *extra)])
    module, policy = cli.model, cli.model.policy
    assert cli.trainer.global_step >= 2 and torch.isfinite(torch.tensor(module.last_metrics["reward"]))
    lora_b = [p for n, p in policy.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b)
    assert max(float(p.detach().abs().max()) for p in lora_b) > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert set(ckpt["state_dict"]) == module.trainable_names()
    assert all("lora_" in n or "algorithm.value" in n for n in ckpt["state_dict"])
    started = StableDiffusion3Policy(
        tiny_sd3,
        prompts=["a cat", "a dog"],
        guidance_scale=policy.guidance_scale,
        max_sequence_length=32,
        lora_rank=policy.lora_rank,
        lora_target_modules=sorted(policy.lora_config.target_modules),
        init_lora=str(tmp_path / "lora"),
    )
    x, t = _inputs(policy, 2)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(started.predict(x, t, labels)[0], policy.predict(x, t, labels)[0])
