"""`ctrl benchmark` on tiny models: every method's row is there with numbers in range, the table, CSV and
figure are written, and a bad benchmark config is refused in one line before any training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_classifier

from ctrl.benchmark import main as benchmark
from ctrl.cli import console

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"


TASKS = {"class": 10, "compressibility": 4, "multitask": 8}


def _tiny_config(tmp_path, tiny_pretrained, task: str = "compressibility"):
    """A benchmark config: ``task`` on the tiny 8x8 model and tiny classifiers, two fine-tuning rows, every
    guidance baseline (classifier-free guidance with a 3-step conditional model), 2 samples per label."""
    tiny = [
        *["--model.policy.pretrained", tiny_pretrained],
        *"--model.evaluator.image_size 8 --model.num_steps 3 --data.batch_size 4 --data.batches_per_epoch 2".split(),
        *"--data.eval_per_label 2 --trainer.logger false".split(),
        *["--trainer.callbacks", json.dumps([{"class_path": "ctrl.callbacks.ResumableCheckpoint"}])],
    ]
    if task == "class":
        tiny += ["--model.reward.path", make_tiny_classifier(tmp_path / "class.safetensors", num_labels=10)]
    elif task == "compressibility":
        tiny = [
            "--config",
            str(CONFIGS / "tasks" / "compressibility.yaml"),
            *tiny,
            "--model.reward.path",
            make_tiny_classifier(tmp_path / "compress.safetensors", num_labels=4),
        ]
    else:  # the two classifiers of the joint reward, swapped in by an overlay of its own
        rewards = [
            {
                "class_path": "ctrl.rewards.ClassifierLogProb",
                "init_args": {"path": make_tiny_classifier(tmp_path / f"{name}.safetensors", num_labels=n)},
            }
            for name, n in (("compress", 4), ("ink", 2))
        ]
        overlay = tmp_path / "tiny_rewards.yaml"
        overlay.write_text(yaml.safe_dump({"model": {"init_args": {"reward": {"init_args": {"rewards": rewards}}}}}))
        tiny = ["--config", str(CONFIGS / "tasks" / "multitask.yaml"), "--config", str(overlay), *tiny]
    cfg_args = [
        "--model.init_from",
        tiny_pretrained,
        "--data.image_size",
        "8",
        "--trainer.max_steps",
        "3",
        "--trainer.logger",
        "false",
    ]
    config = {
        "output": str(tmp_path / "out"),
        "per_label": 2,
        "control_scales": [0.0, 2.0],
        "fine_tuning": [
            {"name": "DirectBackprop", "config": str(CONFIGS / "control.yaml"), "args": tiny},
            {"name": "PPO", "config": str(CONFIGS / "ppo.yaml"), "args": tiny},
        ],
        "inference_time": [
            {"class_path": f"ctrl.inference_time.{name}", "init_args": args}
            for name, args in [
                ("ClassifierFreeGuidance", {"scale": 2.0}),
                ("ReconstructionGuidance", {"scale": 1.0}),
                ("MPGD", {"step_size": 0.5}),
                ("SVDD", {"num_candidates": 3}),
                ("SMC", {"num_particles": 3}),
            ]
        ],
        "baseline_models": [
            {"name": "ClassifierFreeGuidance", "config": str(CONFIGS / f"cfg_{task}.yaml"), "args": cfg_args}
        ],
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.fixture
def tiny_benchmark(tmp_path, tiny_pretrained):
    return _tiny_config(tmp_path, tiny_pretrained)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_method_has_a_row_in_range(task, tmp_path, tiny_pretrained):
    path, config = _tiny_config(tmp_path, tiny_pretrained, task)
    rows = benchmark(["--config", str(path)])
    names = [r["method"] for r in rows]
    assert names == [
        "pretrained",
        "ClassifierFreeGuidance",
        "ReconstructionGuidance",
        "MPGD",
        "SVDD",
        "SMC",
        "DirectBackprop",
        "DirectBackprop gamma=0",
        "DirectBackprop gamma=2",
        "PPO",
    ]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1 and row["frechet"] >= 0, row
        assert row["sampling_s_per_image"] > 0
        fine_tuned = row["method"].split()[0] in ("DirectBackprop", "PPO")
        assert (row["training_s"] > 0) == (fine_tuned or row["method"] == "ClassifierFreeGuidance")
        assert ("kl" in row) == fine_tuned  # the KL to the pretrained chain: fine-tuned rows only
    guided = {r["method"]: r for r in rows}
    assert guided["SVDD"]["denoiser_calls_per_image"] == 1 + 3 * 2  # M candidates at each later step
    label_sets = 2 if task == "multitask" else 1  # one conditional branch per label set, plus the unconditional
    assert guided["ClassifierFreeGuidance"]["denoiser_calls_per_image"] == (1 + label_sets) * 3
    if task == "multitask":  # the per-condition figures beside the pair's
        assert all(0 <= r[f"{name}_accuracy"] <= 1 for r in rows for name in ("compressibility", "ink"))
    assert (Path(config["output"]) / "runs" / "ClassifierFreeGuidance" / "model" / "labels.json").is_file()
    out = Path(config["output"])
    with open(out / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == names
    assert (out / "table.md").read_text().count("\n") == len(rows) + 2
    assert (out / "samples.png").stat().st_size > 0
    # a second run reuses the finished fine-tuning runs (same training seconds)
    again = benchmark(["--config", str(path)])
    assert [r["training_s"] for r in again] == [r["training_s"] for r in rows]


@pytest.mark.parametrize(
    "case, change, expected",
    [
        (
            "unknown method",
            lambda c: c["inference_time"].append({"class_path": "ctrl.inference_time.Telepathy"}),
            "inference_time: 'Telepathy' is not an inference-time method; available: "
            "ClassifierFreeGuidance, MPGD, ReconstructionGuidance, SMC, SVDD",
        ),
        (
            "task without a trained classifier",
            lambda c: c["fine_tuning"][0]["args"].extend(
                ["--model.reward.path", "/nonexistent/classifier.safetensors"]
            ),
            "model.reward.path: no classifier file at '/nonexistent/classifier.safetensors'",
        ),
        (
            "evaluation seeds outside the test set",
            lambda c: c.update(seed=5),
            r"seed=5 gives test seeds \[5, 13\) outside the test range",
        ),
        (
            "prior that does not sum to one",
            lambda c: c["fine_tuning"][1]["args"].extend(["--data.prior", "[0.5, 0.4, 0.05, 0.01]"]),
            "data.prior: .* is not a probability distribution",
        ),
    ],
)
def test_bad_benchmark_config_is_refused_before_training(case, change, expected, tiny_benchmark, capsys, monkeypatch):
    import re

    path, config = tiny_benchmark
    change(config)
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["ctrl", "benchmark", "--config", str(path)])
    with pytest.raises(SystemExit) as exit_:
        console()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ctrl: error:")]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert re.search(expected, err[0]), err[0]
    assert not (Path(config["output"]) / "runs" / "DirectBackprop" / "checkpoints").exists()
