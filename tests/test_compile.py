"""``model.compile``: the policy's networks compiled by torch.compile give the eager predictions and gradients (the
adapter switch between the policy's and the pretrained model's calls included), a run trains through compiled graphs
and checkpoints the same names, and a backend that is unknown or cannot compile is refused in one line before any
step.

The equality check compiles with ``aot_eager`` (dynamo's graph capture and AOT autograd, without inductor's C++
build), which is what could go wrong on our side: a graph that missed the adapter switch or the grad mode; the run
with a counting backend (graph capture only). Inductor on the trl workload is measured by benchmarks/speed.py
--compile and vs_trl.py --ctrl-extra."""

from __future__ import annotations

import pytest
import torch
from conftest import error_line, randomize_lora, tiny_sd_args
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from ctrl.algorithms import PPO
from ctrl.commands import main
from ctrl.module import ControlModule
from ctrl.policy import AnalyticGaussian, StableDiffusionPolicy
from ctrl.rewards import GaussianLogLikelihood


def _predictions_and_gradients(policy, x, t, labels) -> list:
    """eps and eps_pre with gradients (control scale 0.7: both calls), the gradients of x and of every trained
    weight, and the policy's own eps without gradients."""
    policy.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    eps, eps_pre = policy.predict(xg, t, labels, control_scale=0.7)
    (eps.square().sum() + (eps * eps_pre).sum()).backward()
    with torch.no_grad():
        own, _ = policy.predict(x, t, labels, pretrained=False)
    grads = [p.grad.clone() for _, p in sorted(policy.named_parameters()) if p.grad is not None]
    return [eps.detach(), eps_pre.detach(), own, xg.grad, *grads]


def test_compiled_networks_give_the_eager_predictions_and_gradients(tiny_sd):
    policy = StableDiffusionPolicy(tiny_sd, prompts=["a cat", "a dog"], num_classes=2, guidance_scale=3.0, lora_rank=2)
    randomize_lora(policy, seed=0)
    with torch.no_grad():
        policy.unet.class_embedding.weight[:-1].normal_(0, 0.5)
    torch.manual_seed(1)
    x, t, labels = torch.randn(3, *policy.sample_shape), torch.tensor([100, 500, 900]), torch.tensor([0, 3, 1])
    eager = _predictions_and_gradients(policy, x, t, labels)
    counter = CompileCounterWithBackend("aot_eager")
    for network in policy.networks():
        network.compile(backend=counter)
    compiled = _predictions_and_gradients(policy, x, t, labels)
    assert counter.frame_count >= 2  # the calls above went through compiled graphs (adapters on and off at least)
    assert len(compiled) == len(eager) > 4  # LoRA and the class embedding received gradients, both times
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (eager[0] - eager[1]).abs().max() > 1e-3  # a graph that missed the adapter switch would fail above


def test_a_compiled_run_trains_and_checkpoints_the_same_names(tmp_path, tiny_sd):
    args = tiny_sd_args("aesthetic_ddpo", tmp_path, tiny_sd, ["--model.reward", "ctrl.rewards.JpegCompressibility"])
    counter = CompileCounter()  # dynamo's graph capture, each graph run as captured; counted
    torch._dynamo.register_backend(counter, name="ctrl_test_counted")
    no_eval = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]  # only the training calls
    cli = main(["fit", *args, "--model.compile", "ctrl_test_counted", "--model.kl_log_interval", "null", *no_eval])
    module = cli.model
    assert cli.trainer.global_step >= 2 and counter.frame_count >= 3  # the probe, rollouts (no grad), updates
    lora_b = [p for n, p in module.policy.unet.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in lora_b) > 0  # it trained
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert set(ckpt["state_dict"]) == module.trainable_names()
    assert not any("_orig_mod" in name for name in ckpt["state_dict"])  # compiled in place: no wrapper's prefix


def test_an_unknown_backend_and_a_policy_without_networks_are_refused(tmp_path, tiny_sd, monkeypatch, capsys):
    args = tiny_sd_args("aesthetic_ddpo", tmp_path, tiny_sd, ["--model.reward", "ctrl.rewards.JpegCompressibility"])
    line = error_line(["fit", *args, "--model.compile", "indcutor"], monkeypatch, capsys)
    assert line.startswith("ctrl: error: model.compile: 'indcutor' is not a torch.compile backend; give true"), line
    with pytest.raises(ValueError, match=r"^ControlModule\.compile: is True, but AnalyticGaussian calls no network"):
        ControlModule(AnalyticGaussian(dim=2), GaussianLogLikelihood(y=[1.0, 0.0]), PPO(alpha=0.0), compile=True)


def test_a_backend_that_cannot_compile_is_refused_before_any_step(tmp_path, tiny_sd, monkeypatch, capsys):
    def cannot_compile(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    torch._dynamo.register_backend(cannot_compile, name="ctrl_test_cannot_compile")
    args = tiny_sd_args("aesthetic_ddpo", tmp_path, tiny_sd, ["--model.reward", "ctrl.rewards.JpegCompressibility"])
    line = error_line(["fit", *args, "--model.compile", "ctrl_test_cannot_compile"], monkeypatch, capsys)
    assert line.startswith(
        "ctrl: error: model.compile: torch.compile with backend 'ctrl_test_cannot_compile' cannot compile on cpu"
    ), line
    assert "no C++ compiler found" in line and "set it false" in line
    assert not (tmp_path / "checkpoints").exists()
