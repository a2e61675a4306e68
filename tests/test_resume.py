"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with ``--ckpt_path last`` ends with the
same weights, optimizer state and metrics as the uninterrupted run (CPU, fixed seed), for every plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_same, final_state, run_args

# Runs the CLI's trainer with a callback that SIGKILLs the process after a chosen training batch: at the start
# of the next one, so that every callback of that batch (checkpointing included) has run, whatever their order.
CHILD = """
import os, signal, sys
from lightning.pytorch.callbacks import Callback
from ctrl.commands import main

class SigkillAfter(Callback):
    def __init__(self, batch):
        self.batch = batch
    def on_train_batch_start(self, trainer, *args):
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

kill_after, ckpt_path, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
cli = main(args, run=False)
if kill_after:
    cli.trainer.callbacks.append(SigkillAfter(kill_after))
cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=None if ckpt_path == "none" else ckpt_path)
print("METRICS=" + __import__("json").dumps(cli.model.last_metrics))
"""

# (algorithm, optimizer steps between checkpoints, more settings): a checkpoint every two rollouts. PPO and RAFT
# draw minibatch orders and timestep subsets, ContinuousTimePG adds a value network with its own learning rate.
# With accumulation (4 minibatches a rollout, 5 per optimizer step) the last checkpoint before the kill, after
# rollout 3 (12 updates: 2 steps), holds 2 minibatches' gradients: the run resumes between two optimizer steps.
PLUGINS = {
    "DirectBackprop": ({"class_path": "DirectBackprop", "init_args": {"alpha": 0.2}}, 2, []),
    "PPO": (
        {
            "class_path": "PPO",
            "init_args": {
                "alpha": 0.2,
                "clip_range": 0.05,
                "inner_epochs": 2,
                "minibatch_size": 2,
                "timestep_fraction": 0.5,
            },
        },
        8,
        [],
    ),
    "RAFT": (
        {
            "class_path": "RAFT",
            "init_args": {
                "alpha": 0.2,
                "keep_fraction": 0.5,
                "inner_epochs": 2,
                "minibatch_size": 1,
                "timestep_fraction": 0.5,
            },
        },
        8,
        [],
    ),
    "ContinuousTimePG": (
        {"class_path": "ContinuousTimePG", "init_args": {"alpha": 0.2, "clip_range": 0.05, "minibatch_size": 2}},
        4,
        [],
    ),
    "PPO accumulated": (
        {"class_path": "PPO", "init_args": {"alpha": 0.2, "clip_range": 0.05, "minibatch_size": 1}},
        1,
        ["--model.accumulate", "5"],
    ),
}


def _run(root, args, kill_after: int = 0, ckpt_path: str = "none") -> tuple[int, dict]:
    """(exit status, the final evaluation's metrics) of one run in a child process."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(kill_after), ckpt_path, *args], capture_output=True, text=True, timeout=300
    )
    if kill_after == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("METRICS=")]
    return proc.returncode, json.loads(lines[-1][8:]) if lines else {}


@pytest.mark.parametrize("name", PLUGINS)
def test_kill_and_resume_is_exact(name, tmp_path, tiny_pretrained, tiny_classifier):
    algorithm, checkpoint_every, extra = PLUGINS[name]

    def args(root):
        return run_args(
            root,
            tiny_pretrained,
            tiny_classifier,
            "--model.algorithm",
            json.dumps(algorithm),
            *extra,
            checkpoint_every=checkpoint_every,
        )

    _, metrics = _run(tmp_path / "whole", args(tmp_path / "whole"))
    # Killed after rollout 3 of 6: the last checkpoint is from rollout 2, so rollout 3 is redone (with
    # accumulation, from rollout 3).
    status, _ = _run(tmp_path / "cut", args(tmp_path / "cut"), kill_after=3)
    assert status == -9
    if extra:  # the accumulated run resumes between two optimizer steps, two minibatches' gradients pending
        saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == 2 and saved["ctrl"]["accumulation"]["updates"] == 2
    _, resumed_metrics = _run(tmp_path / "cut", args(tmp_path / "cut"), ckpt_path="last")

    assert set(metrics) >= {"accuracy", "frechet", "reward", "kl"}
    assert_same(metrics, resumed_metrics, atol=1e-6)
    weights, state = final_state(tmp_path / "whole")
    resumed_weights, resumed_state = final_state(tmp_path / "cut")
    assert_same(weights, resumed_weights, atol=1e-6)
    assert_same(state, resumed_state, atol=1e-6)
