"""Speed of ctrl's training on the workload trl's DDPO and AlignProp trainers were compared on: seconds per
epoch, peak memory, UNet calls per image (counted by a hook, not assumed) and the overhead over the bare
compute floor (the same UNet calls timed alone, in the same run); with gradient checkpointing also the overhead over
that floor plus the forward each checkpointed call recomputes in the backward (what memory flat in K costs).

    python benchmarks/speed.py --threads 1                     # every plugin, CPU
    python benchmarks/speed.py --plugins PPO DirectBackprop --epochs 4 --output benchmarks/speed
    python benchmarks/speed.py --threads 1 --compile inductor --output benchmarks/speed_compiled   # model.compile

Workload (each plugin; the DDPO / AlignProp settings of trl 0.23.1's trainers): a tiny random Stable
Diffusion pipeline built offline (UNet 793k parameters, 16x16 latents, 32x32 images), 50 DDIM steps, eta 1,
classifier-free guidance 5, LoRA rank 4 on to_q/to_k/to_v/to_out.0, 8 images per epoch as 2 rollouts of 4,
fp32, no KL (alpha 0: neither trainer has one; ctrl's KL log is off, as trl computes none), no checkpoints, no
validation. Score-function plugins: the JPEG-size reward, minibatches of 2, every timestep; DirectBackprop: a
differentiable image-gradient reward, K ~ U{1..50} backpropagated steps with gradient checkpointing. Each plugin
runs in its own process (peak RSS is its own); s/epoch is the median over the epochs after the first. Writes
``<output>/speed.json`` and ``<output>/speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from ctrl.module import compile_backends
from ctrl.rewards.base import Reward

PLUGINS = {
    "PPO": {"class_path": "PPO", "init_args": {"alpha": 0.0, "clip_range": 1e-4, "minibatch_size": 2}},
    "ContinuousTimePG": {"class_path": "ContinuousTimePG", "init_args": {"alpha": 0.0, "minibatch_size": 2}},
    "RAFT": {"class_path": "RAFT", "init_args": {"alpha": 0.0, "keep_fraction": 0.5, "minibatch_size": 2}},
    "DirectBackprop": {"class_path": "DirectBackprop", "init_args": {"alpha": 0.0, "random_truncation": True}},
}
PROMPTS = ["a photo of a cat", "a photo of a dog", "a painting of a horse", "a red apple on a table"]


class ImageGradient(Reward):
    """AlignProp's differentiable stand-in for compressibility: ``-100 (mean |dI/dx| + mean |dI/dy|)`` of the
    image in [0, 1]."""

    differentiable = True

    def forward(self, x0, labels=None):
        images = (x0 + 1) / 2
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        return -100 * (dx + dy)


def make_pipeline(directory: Path) -> str:
    """The workload's tiny pipeline: ctrl's test pipeline at the peer workload's sizes."""
    from ctrl.testing import make_tiny_sd

    unet = dict(sample_size=16, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4)
    return make_tiny_sd(directory, unet=unet, vae=dict(block_out_channels=(32, 64)), text=text)


def config(plugin: str, pipeline: str, epochs: int, compile: str | None = None) -> dict:
    """The ``ctrl fit`` config of the workload for ``plugin`` (``compile``: a torch.compile backend for the UNet)."""
    direct = plugin == "DirectBackprop"
    reward = {"class_path": "__main__.ImageGradient"} if direct else {"class_path": "ctrl.rewards.JpegCompressibility"}
    model = {
        "num_steps": 50,
        "eta": 1.0,
        "eval_pretrained": False,
        "kl_log_interval": None,  # trl computes no KL; ctrl's log of it is one pretrained pass per logged rollout
        "max_grad_norm": 1.0,
        "gradient_checkpointing": direct,
        "policy": {
            "class_path": "ctrl.policy.StableDiffusionPolicy",
            "init_args": {
                "pretrained": pipeline,
                "prompts": PROMPTS,
                "guidance_scale": 5.0,
                "lora_rank": 4,
                "lora_lr": 3e-4,
                "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            },
        },
        "reward": reward,
        "algorithm": PLUGINS[plugin],
        "compile": compile or False,
    }
    data = {"batch_size": 4, "group_size": 1, "batches_per_epoch": 2, "eval_per_label": 1}
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": epochs,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "ctrl.module.ControlModule", "init_args": model},
        "data": {"class_path": "ctrl.datamodules.PromptsDataModule", "init_args": data},
    }


class EpochClock(Callback):
    """Each training epoch's wall and CPU seconds and mean rollout reward (``train/reward`` over its steps), written
    to ``path`` (JSON: ``epoch_s``, ``cpu_s``, ``epoch_reward``) after every epoch when given: trl_peer.py times
    trl's epochs the same way (``trainer.step``: sampling and training) and records their rewards."""

    def __init__(self, path: str | None = None, minutes: float | None = None):
        """``minutes``: stop training after the epoch whose end passes this much summed epoch time (trl_peer.py's
        ``--minutes`` rule)."""
        self.path, self.minutes, self.epochs, self.cpu, self.rewards = path, minutes, [], [], []

    def on_train_epoch_start(self, trainer, module):
        self._start, self._cpu, self._rewards = time.perf_counter(), time.process_time(), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        reward = trainer.callback_metrics.get("train/reward")
        if reward is not None:
            self._rewards.append(float(reward))

    def on_train_epoch_end(self, trainer, module):
        self.epochs.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu)
        self.rewards.append(statistics.mean(self._rewards) if self._rewards else None)
        if self.path:
            figures = {"epoch_s": self.epochs, "cpu_s": self.cpu, "epoch_reward": self.rewards}
            Path(self.path).write_text(json.dumps(figures))
        if self.minutes is not None and sum(self.epochs) >= 60 * self.minutes:
            trainer.should_stop = True


class Meter(EpochClock):
    """Epoch wall times and each epoch's UNet calls (their batch, and whether they built a graph)."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[tuple[int, bool]]] = [[]]  # per epoch

    def on_fit_start(self, trainer, module):
        hook = module.policy.networks()[0].register_forward_hook  # the denoiser
        self.hook = hook(lambda _, args, __: self.calls[-1].append((len(args[0]), torch.is_grad_enabled())))

    def on_fit_end(self, trainer, module):
        self.hook.remove()  # the floor's own calls are not the run's

    def on_train_epoch_start(self, trainer, module):
        self.calls.append([])
        super().on_train_epoch_start(trainer, module)


def _unet_seconds(unet, x: torch.Tensor, states: torch.Tensor, grad: bool, reps: int = 9) -> float:
    """Seconds of one UNet call on ``x`` (with its backward when ``grad``): the median of ``reps`` calls after a
    warm-up call. An epoch makes hundreds of calls of one shape, so the floor multiplies this figure; the mean of
    3 calls moved the PPO floor by 25 % between runs whose epochs took the same time."""

    def once() -> float:
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = unet(x, torch.tensor(500), encoder_hidden_states=states).sample
            if grad:
                out.square().mean().backward()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(reps))


def floor_seconds(module, calls: list[tuple[int, bool]]) -> tuple[float, float]:
    """The same UNet calls (batch, with or without backward) timed alone: the bare compute of an epoch; and that
    floor plus one forward per call with a graph when the module checkpoints them (the forward its backward
    recomputes, which keeps memory flat in the number of backpropagated steps; the call hook does not see it)."""
    policy = module.policy
    recomputes = [(batch, False) for batch, grad in calls if grad] if module.gradient_checkpointing else []
    cost = {}
    for batch, grad in sorted(set(calls + recomputes)):
        x = torch.randn(batch, *policy.sample_shape)
        states = policy.prompt_embeds[torch.zeros(batch, dtype=torch.long)]
        cost[batch, grad] = _unet_seconds(policy.unet, x, states, grad)
    floor = sum(cost[c] for c in calls)
    return floor, floor + sum(cost[c] for c in recomputes)


def worker(plugin: str, pipeline: str, epochs: int, compile: str | None) -> dict:
    from ctrl.commands import main

    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(json.dumps(config(plugin, pipeline, epochs, compile)))  # JSON is YAML
        cli = main(["--config", str(path), "--trainer.default_root_dir", tmp], run=False)
        cli.trainer.callbacks.append(meter)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    images, last = 8, meter.calls[-1]  # the last epoch's calls
    floor, floor_recomputed = floor_seconds(cli.model, last)
    sec = statistics.median(meter.epochs[1:])
    return {
        "plugin": plugin,
        "compile": compile,
        "s_per_epoch": sec,
        "s_per_image": sec / images,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unet_calls_per_image": len(last) / images,
        "floor_s_per_epoch": floor,
        "overhead": sec / floor,
        "floor_recomputed_s_per_epoch": floor_recomputed,
        "overhead_recomputed": sec / floor_recomputed,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="+", default=list(PLUGINS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/speed")
    parser.add_argument("--compile", help="a torch.compile backend for the UNet (model.compile), e.g. inductor")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for plugin in args.plugins:
        if plugin not in PLUGINS:
            parser.error(f"--plugins: '{plugin}' is not a plugin of this workload; choose from {sorted(PLUGINS)}.")
    if args.compile and args.compile not in compile_backends():
        parser.error(f"--compile: '{args.compile}' is not a torch.compile backend; choose from {compile_backends()}.")
    if args.epochs < 2:
        parser.error(f"--epochs: at least 2 (the first is not timed), got {args.epochs}.")
    torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.pipeline, args.epochs, args.compile)), flush=True)
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = make_pipeline(Path(tmp) / "tiny-sd")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        for plugin in args.plugins:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                plugin,
                "--pipeline",
                pipeline,
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
                *(["--compile", args.compile] if args.compile else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"speed: the {plugin} run failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][7:]))
            print(rows[-1], flush=True)
    write(rows, Path(args.output), args)
    return rows


def write(rows: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"threads {args.threads}, {args.epochs} epochs (median of the last {args.epochs - 1}), UNet compiled: "
        f"{args.compile or 'no'}",
        "",
        "| plugin | s/epoch | s/image | peak RSS MiB | UNet calls / image | floor s/epoch | overhead "
        "| floor with checkpoint recomputation s/epoch | overhead over it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['plugin']} | {r['s_per_epoch']:.2f} | {r['s_per_image']:.2f} | {r['peak_rss_mib']:.0f} | "
        f"{r['unet_calls_per_image']:.1f} | {r['floor_s_per_epoch']:.2f} | {r['overhead']:.2f}x | "
        f"{r['floor_recomputed_s_per_epoch']:.2f} | {r['overhead_recomputed']:.2f}x |"
        for r in rows
    ]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
