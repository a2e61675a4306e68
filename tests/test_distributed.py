"""DDP on CPU (gloo): two processes with the same global batch and seeds reach the weights of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same, final_state, run_args, tiny_control_args
from PIL import Image

ALGORITHMS = {
    "DirectBackprop": {"class_path": "DirectBackprop", "init_args": {"alpha": 0.2}},
    # the whole rollout in one minibatch: its advantage baselines are global sums over both ranks
    "PPO": {
        "class_path": "PPO",
        "init_args": {"alpha": 0.2, "clip_range": 0.05, "advantages": "standardize", "per_condition": True},
    },
    # backpropagated step by step, each step's part reaching both the policy and the value network
    "ContinuousTimePG": {"class_path": "ContinuousTimePG", "init_args": {"alpha": 0.2, "clip_range": 0.05}},
    # weights normalised per label over both ranks' chains (gathered), not within each rank
    "RAFT tilted": {"class_path": "RAFT", "init_args": {"alpha": 0.2, "selection": "tilted"}},
    # gradients kept on each rank until every second rollout; the third leaves them pending in the checkpoint
    "DirectBackprop accumulated": {"class_path": "DirectBackprop", "init_args": {"alpha": 0.2}},
}
#: more settings of a case
EXTRA = {"DirectBackprop accumulated": ["--model.accumulate", "2"]}


def _run(root, devices: int, extra: list[str], subcommand: str = "fit") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctrl.cli",
            subcommand,
            *extra,
            "--trainer.devices",
            str(devices),
            "--trainer.strategy",
            "ddp" if devices > 1 else "auto",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_processes_match_one(name, tmp_path, tiny_pretrained, tiny_classifier):
    def args(root):
        algorithm = ["--model.algorithm", json.dumps(ALGORITHMS[name]), *EXTRA.get(name, [])]
        sizes = "--data.batches_per_epoch 3 --data.eval_per_label 3 --data.batch_size 8".split()
        # two labels, 4 chains each per batch: per-label baselines over both ranks' chains
        prior = ["--data.prior", json.dumps([0.5, 0.5] + [0.0] * 8)]
        return run_args(root, tiny_pretrained, tiny_classifier, *algorithm, *sizes, *prior)

    _run(tmp_path / "one", 1, args(tmp_path / "one"))
    two = _run(tmp_path / "two", 2, args(tmp_path / "two"))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two.stderr + two.stdout

    weights, state = final_state(tmp_path / "one")
    weights_ddp, state_ddp = final_state(tmp_path / "two")
    assert weights["policy.step_bias"].abs().max() > 1e-3  # training moved the control
    assert_same(weights, weights_ddp, atol=1e-5)
    assert_same(state["optimizer"], state_ddp["optimizer"], atol=1e-5)
    # gradients still waiting for a step: one process's, and the mean of the two ranks' that the checkpoint keeps
    pending, pending_ddp = state["accumulation"], state_ddp["accumulation"]
    assert (pending["updates"], pending["rollouts"]) == (pending_ddp["updates"], pending_ddp["rollouts"])
    assert pending["grads"].keys() == pending_ddp["grads"].keys() and bool(pending["grads"]) == (name in EXTRA)
    for key, grad in pending["grads"].items():
        torch.testing.assert_close(grad, pending_ddp["grads"][key], rtol=1e-5, atol=1e-5)
    # The metrics are over all 30 samples, gathered from both ranks (each rank computes them on the gathered set,
    # torchmetrics' own cross-process sync off). The Frechet distance of 30 samples in 20 dimensions goes
    # through the square root of a near-singular matrix, which turns float rounding of 1e-6 in the samples into
    # ~1e-3: it gets a looser tolerance than the rest.
    for one, two in (
        (state["baselines"]["val"], state_ddp["baselines"]["val"]),
        (state["last_metrics"], state_ddp["last_metrics"]),
    ):
        one, two = dict(one), dict(two)
        assert one.pop("frechet") == pytest.approx(two.pop("frechet"), rel=2e-2)
        assert_same(one, two, atol=1e-5)


def test_two_processes_predict_the_whole_grid(tmp_path, tiny_pretrained, tiny_classifier):
    """Under DDP each process predicts its own share (5 and 4 of 9 samples here): the grid written holds all of
    them, in the order one process writes them."""

    def args(root):
        grid = {"class_path": "ctrl.callbacks.PredictionGrid", "init_args": {"path": str(root / "grid.png")}}
        labels = ["--data.predict_labels", "[1, 3, 7]", "--data.predict_per_label", "3", "--data.eval_batch_size", "2"]
        callbacks = ["--trainer.callbacks", json.dumps([grid]), "--trainer.logger", "false"]
        return [*tiny_control_args(root, tiny_pretrained, tiny_classifier), *callbacks, *labels]

    one = _run(tmp_path / "one", 1, args(tmp_path / "one"), "predict")
    two = _run(tmp_path / "two", 2, args(tmp_path / "two"), "predict")
    assert "wrote 9 samples (3 labels" in one.stdout and "wrote 9 samples (3 labels" in two.stdout
    grid_one = torch.tensor(np.asarray(Image.open(tmp_path / "one" / "grid.png")), dtype=torch.int16)
    grid_two = torch.tensor(np.asarray(Image.open(tmp_path / "two" / "grid.png")), dtype=torch.int16)
    assert grid_one.shape == grid_two.shape and grid_one.float().std() > 0
    assert (grid_one - grid_two).abs().max() <= 1  # 8-bit rounding of samples equal to ~1e-6
