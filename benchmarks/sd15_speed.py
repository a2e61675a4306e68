"""Speed and memory of the Stable Diffusion policy per plugin: the real SD 1.5 architecture with random
weights (nothing can be downloaded on the benchmark machines), bf16 frozen weights, LoRA rank 4,
gradient checkpointing, 512x512.

For each plugin and batch size it reports rollout images per second (50 steps, CFG 7.5, no gradient),
the time of one training step (rollout + the plugin's updates), peak GPU memory of the training step,
and FLOPs per training step (torch's FlopCounterMode) over the measured bf16 matmul peak (MFU; the
count includes the forward passes that gradient checkpointing recomputes, so it reads higher than
the useful work).

    python benchmarks/sd15_speed.py --batch 1 4 8                 # on a GPU
    python benchmarks/sd15_speed.py --tiny --batch 1 2 --steps 4  # the harness itself, on a CPU

Rewards: DirectBackprop scores with a random RGB classifier (differentiable, like the first paper's),
the score-function plugins with JPEG compressibility.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

PLUGINS = {
    # the first paper draws K ~ U{1..50}; a fixed K = 25 (its mean) keeps the timing and the FLOP count comparable
    "DirectBackprop": dict(alpha=1e-5, backprop_steps=25),
    "PPO": dict(alpha=0.0, clip_range=0.2, timestep_fraction=0.2),
    "ContinuousTimePG": dict(alpha=0.0, clip_range=0.2, timestep_fraction=0.2),
    "RAFT": dict(keep_fraction=0.5, timestep_fraction=0.2),
}


def settings(name: str, num_steps: int) -> dict:
    """A plugin's settings for a run of ``num_steps`` steps (K = 25 needs that many stochastic steps)."""
    if name == "DirectBackprop":
        return {**PLUGINS[name], "backprop_steps": min(PLUGINS[name]["backprop_steps"], num_steps)}
    return PLUGINS[name]


def make_sd15(directory: Path) -> str:
    """SD 1.5's architecture (UNet 320-640-1280-1280, cross-attention 768, VAE 128-256-512-512, CLIP
    ViT-L/14 text tower) with random weights, saved in bf16, and the byte-level test tokenizer (77 tokens)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrl.testing import make_tiny_sd

    make_tiny_sd(directory)  # tokenizer and scheduler layout; the models are replaced below
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(
        torch.bfloat16
    ).save_pretrained(directory / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ).to(torch.bfloat16).save_pretrained(directory / "vae")
    tokenizer_config = json.loads((directory / "tokenizer" / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 77
    (directory / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    text = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    text.update(num_attention_heads=12, max_position_embeddings=77)  # CLIP ViT-L/14's text tower
    CLIPTextModel(CLIPTextConfig(**text)).to(torch.bfloat16).save_pretrained(directory / "text_encoder")
    return str(directory)


def training_step(module, optimizer, labels: torch.Tensor, num_steps: int) -> None:
    """One rollout of ``labels`` and the plugin's optimizer steps on it: the network calls and backward passes of
    ``ControlModule._train_on`` without a Trainer (the pretrained model evaluated only when the algorithm reads it,
    each update backpropagated through the algorithm's ``backward_loss``; no KL logging)."""
    from ctrl.sampling import make_grid, sample

    policy, reward, algorithm = module.policy, module.reward, module.algorithm
    plan = algorithm.gradient_plan(int((make_grid(policy.scheduler, num_steps, 1.0).sigma > 0).sum()))
    with torch.set_grad_enabled(plan.steps > 0 or plan.kl_steps > 0):
        traj = sample(
            policy,
            labels,
            num_steps,
            1.0,
            grad_steps=plan.steps,
            grad_weights=plan.weights,
            kl_grad_steps=plan.kl_steps,
            gradient_checkpointing=True,
            pretrained=algorithm.needs_pretrained,
        )
    for item in algorithm.updates(traj, policy, reward):
        optimizer.zero_grad()
        algorithm.backward_loss(item, policy, reward, torch.Tensor.backward)
        optimizer.step()


def build(name: str, pipeline: str, classifier: Path, dtype: str, num_steps: int, device: torch.device):
    """The plugin ``name``'s module on ``pipeline`` (DirectBackprop: 4 classes and ``classifier``'s reward; the
    others: the 2 prompts unconditioned and the JPEG reward) and its AdamW over every trainable group."""
    from ctrl.module import ControlModule
    from ctrl.policy import StableDiffusionPolicy
    from ctrl.registry import get_algorithm
    from ctrl.rewards import ClassifierLogProb, JpegCompressibility

    conditional = name == "DirectBackprop"
    policy = StableDiffusionPolicy(
        pipeline,
        prompts=["a photo of a cat", "a photo of a dog"],
        num_classes=4 if conditional else 0,
        guidance_scale=7.5,
        dtype=dtype,
        lora_rank=4,
    )
    reward = ClassifierLogProb(str(classifier)) if conditional else JpegCompressibility()
    algorithm = get_algorithm(name)(**settings(name, num_steps))
    module = ControlModule(
        policy, reward, algorithm, num_steps=num_steps, gradient_checkpointing=True, eval_pretrained=False
    ).to(device)
    return module, torch.optim.AdamW(policy.param_groups() + module.algorithm.param_groups())


def measure(module, optimizer, batch: int, num_steps: int, device: torch.device, peak: float) -> dict:
    """One plugin at one batch: rollout images/s (no gradient, the policy alone, decode included), then one
    training step's seconds, peak memory and FLOPs (each after a warm-up); ``train_step_s`` None when it ran out
    of memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctrl.sampling import sample

    policy = module.policy
    labels = torch.arange(batch, device=device) % policy.num_labels
    train_step = partial(training_step, module, optimizer, labels, num_steps)
    with torch.no_grad():
        sample(policy, labels, 2, 1.0, pretrained=False)
        sync(device)
        start = time.perf_counter()
        traj = sample(policy, labels, num_steps, 1.0, pretrained=False)
        policy.decode(traj.samples)
        sync(device)
        rollout = batch / (time.perf_counter() - start)
    try:
        train_step()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        train_step()
        sync(device)
        step_s = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        with FlopCounterMode(display=False) as counter:
            train_step()
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return dict(batch=batch, rollout_images_per_s=rollout, train_step_s=None)
    flops = counter.get_total_flops()
    return dict(
        batch=batch,
        rollout_images_per_s=rollout,
        train_step_s=step_s,
        peak_gib=memory,
        tflop_per_step=flops / 1e12,
        mfu=flops / step_s / peak,
    )


def bf16_peak(device: torch.device) -> float:
    """Measured dense bf16 matmul throughput (FLOP/s) of 8192^2 products: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--plugins", nargs="+", default=list(PLUGINS))
    parser.add_argument("--tiny", action="store_true", help="the tiny test pipeline (checks the harness on a CPU)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    from ctrl.classifier import ConvClassifier, save_classifier
    from ctrl.testing import make_tiny_sd

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="sd15-bench-"))
    pipeline = make_tiny_sd(work / "pipe") if args.tiny else make_sd15(work / "pipe")
    save_classifier(ConvClassifier(num_labels=4, channels=3, width=32), 1.0, work / "clf.safetensors")
    peak = bf16_peak(device)
    dtype = "float32" if args.tiny or device.type == "cpu" else "bfloat16"
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"measured matmul peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})"
    )
    print(
        f"{'plugin':<18}{'batch':>6}{'rollout img/s':>15}{'train step s':>14}{'peak GiB':>10}"
        f"{'TFLOP/step':>12}{'MFU':>7}"
    )
    rows = []
    for name in args.plugins:
        module, optimizer = build(name, pipeline, work / "clf.safetensors", dtype, args.steps, device)
        for batch in args.batch:
            row = {"plugin": name, **measure(module, optimizer, batch, args.steps, device, peak)}
            if row["train_step_s"] is None:
                print(f"{name:<18}{batch:>6}{row['rollout_images_per_s']:>15.3f}  training step: out of memory")
            else:
                print(
                    f"{name:<18}{batch:>6}{row['rollout_images_per_s']:>15.3f}{row['train_step_s']:>14.2f}"
                    f"{row['peak_gib']:>10.1f}{row['tflop_per_step']:>12.1f}{row['mfu']:>7.1%}",
                    flush=True,
                )
            rows.append(row)
            if args.out:  # every finished row is kept, whatever happens to the next
                Path(args.out).write_text(json.dumps(rows, indent=1))
        del module, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
