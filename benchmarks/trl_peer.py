"""trl's side of benchmarks/vs_trl.py: one of trl 0.23.1's trainers (DDPOTrainer or AlignPropTrainer), as
released, on the tiny pipeline vs_trl.py builds, timed epoch by epoch. It runs in a venv that has trl (see
vs_trl.py's docstring) and imports nothing from ctrl, which that venv lacks.

    python benchmarks/trl_peer.py --trainer ddpo --pipeline DIR --prompts '["a cat", ...]' --epochs 4 --threads 1

With ``--minutes M`` it stops after the epoch that passes M minutes of training (benchmarks/time_to_reward.py);
every epoch's mean reward is in the JSON (``epoch_reward``) either way.

The first epoch is a warm-up; the median of the other epochs' wall times is the figure. Peak resident size is
this process's own (getrusage), so run one trainer per process. The last line on stdout is one JSON object.

Settings (trl's names): 50 DDIM steps, eta 1, guidance 5, mixed precision "no" (fp32), trl's default LoRA
(DefaultDDPOStableDiffusionPipeline(use_lora=True): rank 4 on to_q/to_k/to_v/to_out.0), 8 images per epoch
(4 per batch, 2 batches), no checkpoint written. DDPO: sample_batch_size 4 x sample_num_batches_per_epoch 2,
train_batch_size 2, train_timestep_fraction 1 (every step trained), 1 inner epoch, reward -(JPEG size in kB
at quality 95). AlignProp: train_batch_size 4 x train_gradient_accumulation_steps 2, truncated_backprop_rand
with (0, 50) (trl's default; ``--truncation last``: the last step only) and gradient checkpointing (trl's
rgb_with_grad default), reward
-100 (mean |dI/dx| + mean |dI/dy|) of the image in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=("ddpo", "alignprop"), required=True)
    parser.add_argument("--pipeline", required=True, help="a StableDiffusionPipeline directory")
    parser.add_argument("--prompts", required=True, help="JSON list of the prompts to draw from")
    parser.add_argument("--epochs", type=int, default=4, help="epochs in all, the first one untimed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, help="stop after the epoch that passes this much training time")
    parser.add_argument(
        "--truncation",
        choices=("random", "last"),
        default="random",
        help="AlignProp: random (trl's default truncated_backprop_rand over (0, 50)) or last (truncated_backprop_rand "
        "false, truncated_backprop_timestep 49: only the last step's UNet call carries gradient, as DRaFT-1)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="the trainer's train_learning_rate (default: trl's, 1e-3 for AlignProp and 3e-4 for DDPO)",
    )
    args = parser.parse_args(argv)
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning-rate: a positive rate, got {args.learning_rate}.")
    if args.trainer == "ddpo" and args.truncation != "random":
        parser.error(f"--truncation {args.truncation}: AlignProp's setting; DDPO backpropagates no chain.")
    if args.epochs < 2:
        parser.error(f"--epochs: at least 2 (the first is not timed), got {args.epochs}.")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes: a positive time, got {args.minutes}.")
    return args


ARGS = arguments()
for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported
    os.environ[name] = str(ARGS.threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

warnings.filterwarnings("ignore")  # trl marks both trainers deprecated; that is the point of the comparison
torch.set_num_threads(ARGS.threads)

import accelerate  # noqa: E402
import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from trl import (  # noqa: E402
    AlignPropConfig,
    AlignPropTrainer,
    DDPOConfig,
    DDPOTrainer,
    DefaultDDPOStableDiffusionPipeline,
)

STEPS, ETA, GUIDANCE = 50, 1.0, 5.0
BATCH, BATCHES, TRAIN_BATCH = 4, 2, 2  # 8 images per epoch


def jpeg_reward(images, prompts, metadata):
    """``-kB`` of each image saved as a JPEG at quality 95; ``images`` ``[B, 3, H, W]`` in [0, 1]."""
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    sizes = []
    for image in pixels.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes), {}


def gradient_reward(images, prompts, metadata):
    """Differentiable: ``-100 (mean |dI/dx| + mean |dI/dy|)`` of each image in [0, 1]."""
    across = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return -100 * (across + down), {}


REWARDS: list[float] = []  # every image's reward, in the order the trainer asked for them


def recorded(reward_fn):
    """``reward_fn`` with each image's reward kept in REWARDS (the epoch's mean reward is read from there)."""

    def reward(images, prompts, metadata):
        rewards, info = reward_fn(images, prompts, metadata)
        REWARDS.extend(rewards.detach().float().tolist())
        return rewards, info

    return reward


def versions() -> dict:
    modules = (torch, diffusers, transformers, peft, accelerate, trl)
    return {"python": sys.version.split()[0], **{m.__name__: m.__version__ for m in modules}}


def make_trainer(args, prompt_fn):
    """trl's DDPOTrainer (the JPEG reward, every timestep) or AlignPropTrainer (the image-gradient reward,
    ``args.truncation``) on the tiny pipeline, with the workload's shared settings; and its config."""
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    shared = dict(
        num_epochs=args.epochs,
        sample_num_steps=STEPS,
        sample_eta=ETA,
        sample_guidance_scale=GUIDANCE,
        mixed_precision="no",
        save_freq=10**9,  # no checkpoint inside the timed epochs
        log_with=None,
        seed=args.seed,
    )
    if args.learning_rate is not None:
        shared["train_learning_rate"] = args.learning_rate
    if args.trainer == "ddpo":
        config = DDPOConfig(
            sample_batch_size=BATCH,
            sample_num_batches_per_epoch=BATCHES,
            train_batch_size=TRAIN_BATCH,
            train_timestep_fraction=1.0,
            train_num_inner_epochs=1,
            **shared,
        )
        trainer = DDPOTrainer(config, recorded(jpeg_reward), prompt_fn, pipeline)
    else:
        config = AlignPropConfig(
            train_batch_size=BATCH,
            train_gradient_accumulation_steps=BATCHES,
            truncated_backprop_rand=args.truncation == "random",
            truncated_rand_backprop_minmax=(0, STEPS),
            truncated_backprop_timestep=STEPS - 1,  # read only when not random: step i < 49 is detached
            **shared,
        )
        trainer = AlignPropTrainer(config, recorded(gradient_reward), prompt_fn, pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    return trainer, config


def train(args, trainer) -> tuple[list[float], list[float], list[float]]:
    """Run the trainer's epochs (up to ``args.minutes`` of them): each epoch's wall seconds, CPU seconds and mean
    reward."""
    walls, cpus, rewards, step = [], [], [], 0
    for epoch in range(args.epochs):
        wall, cpu, seen = time.perf_counter(), time.process_time(), len(REWARDS)
        step = trainer.step(epoch, step)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        rewards.append(statistics.mean(REWARDS[seen:]))
        print(
            f"[{args.trainer}] epoch {epoch}: {walls[-1]:.2f} s, reward {rewards[-1]:.4f}", file=sys.stderr, flush=True
        )
        if args.minutes is not None and sum(walls) >= 60 * args.minutes:
            break
    return walls, cpus, rewards


def main() -> None:
    args = ARGS
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    accelerate.PartialState()  # the pipeline logs through accelerate before any trainer makes its state
    prompts = json.loads(args.prompts)
    draw = random.Random(args.seed)

    def prompt_fn():
        return draw.choice(prompts), {}

    start = time.perf_counter()
    trainer, config = make_trainer(args, prompt_fn)
    setup_s = time.perf_counter() - start
    before = [p.detach().clone() for p in trainer.trainable_layers]
    walls, cpus, rewards = train(args, trainer)
    moved = sum(float((p.detach() - b).norm()) for p, b in zip(trainer.trainable_layers, before))
    result = {
        "trainer": args.trainer,
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "truncation": args.truncation if args.trainer == "alignprop" else None,
        "learning_rate": config.train_learning_rate,
        "setup_s": setup_s,
        "epoch_s": walls,
        "epoch_reward": rewards,  # the mean reward of the images the epoch drew (DDPO) or trained on (AlignProp)
        "epoch_cpu_s": cpus,
        "s_per_epoch": statistics.median(walls[1:] or walls),
        "cpu_s_per_epoch": statistics.median(cpus[1:] or cpus),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lora_parameters": sum(p.numel() for p in trainer.trainable_layers),
        "lora_moved": moved > 0,  # trl's LoRA starts with B = 0: no change would mean no training
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
