"""benchmarks/vs_trl.py (and speed.py) without trl: bad input is refused in one line before anything runs, and the
ctrl configs it writes parse (every row, extra arguments included) with the settings the comparison depends on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import vs_trl  # noqa: E402


def _refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        vs_trl.main(argv)
    message = str(done.value.code)
    assert message.startswith("vs_trl: ") and "\n" not in message, message
    return message


def test_refusals(tmp_path):
    assert "--trl-python is required" in _refusal([])
    assert "no such executable" in _refusal(["--trl-python", str(tmp_path / "python")])
    # a python without trl (ctrl's venv has none), and one whose trl is another release
    assert "cannot import trl" in _refusal(["--trl-python", sys.executable])
    other = tmp_path / "other_python"
    other.write_text("#!/bin/sh\necho 0.24.0\n")
    other.chmod(0o755)
    message = _refusal(["--trl-python", str(other)])
    assert "--trl-python" in message and "trl 0.24.0, not 0.23.x" in message and "python3 -m venv" in message
    assert "'Nope' is not a plugin" in _refusal(["--trl-python", sys.executable, "--ctrl-extra", "Nope:--x 1"])
    assert "give PLUGIN:ARGS" in _refusal(["--trl-python", sys.executable, "--ctrl-extra", "PPO"])
    assert "--epochs: at least 2" in _refusal(["--trl-python", sys.executable, "--epochs", "1"])
    assert "--repeats: at least 1" in _refusal(["--trl-python", sys.executable, "--repeats", "0"])


def test_speed_refuses_a_plugin_or_backend_that_does_not_exist(capsys):
    import speed

    for argv, expected in [
        (["--plugins", "Nope"], "--plugins: 'Nope' is not a plugin of this workload"),
        (["--compile", "indcutor"], "--compile: 'indcutor' is not a torch.compile backend"),
    ]:
        with pytest.raises(SystemExit) as done:
            speed.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and expected in err[-1], err


def test_each_repeat_gives_its_own_ratio():
    """Two repeats in turn: each row's ratio is the mean of the repeats' own ratios, with their spread; an extra
    row is also read against its plugin's base row, repeat by repeat."""
    rows = [{"plugin": p, "args": [], "base": True, "trl": vs_trl.trl_trainer(p)} for p in vs_trl.BASE_ROWS]
    rows.append({**vs_trl.parse_extra("PPO:--x 1"), "trl": "ddpo"})

    def figures(pairs):
        return [{"s_per_epoch": sec, "peak_rss_mib": rss} for sec, rss in pairs]

    trl = [figures([(20.0, 600.0), (10.0, 900.0)]), figures([(25.0, 620.0), (12.0, 950.0)])]  # DDPO, AlignProp
    ctrl = [
        figures([(18.0, 550.0), (11.0, 1000.0), (15.0, 700.0)]),
        figures([(20.0, 560.0), (12.0, 1100.0), (16.0, 710.0)]),
    ]
    repeats = [{"trl": dict(zip(("ddpo", "alignprop"), t)), "ctrl": c} for t, c in zip(trl, ctrl)]
    vs_trl.summarise(rows, repeats)
    ppo, direct, extra = rows
    assert ppo["time_ratio"] == pytest.approx((18 / 20 + 20 / 25) / 2)
    assert ppo["time_ratio_std"] == pytest.approx(abs(18 / 20 - 20 / 25) / 2**0.5)
    assert direct["memory_ratio"] == pytest.approx((1000 / 900 + 1100 / 950) / 2)
    assert extra["time_vs_base"] == pytest.approx((15 / 18 + 16 / 20) / 2) and "time_vs_base" not in ppo
    report = {"repeats": 2, "epochs": 4, "threads": 1, "date": "d", "loadavg_start": [0.0], "loadavg_end": [0.0]}
    report.update(machine={"cpu_model": "cpu", "cpus_usable": 2, "cpu_count": 2}, rows=rows)
    report.update(trl={"versions": {"trl": "0.23.1", "torch": "t"}}, ctrl={"versions": {"torch": "t"}})
    text = vs_trl.table(report)
    assert "| DDPO / PPO | 22.50 +- 3.54 | 610 +- 14 | 19.00 +- 1.41 |" in text and "mean +- std over 2 repeat" in text


def test_configs_parse(tmp_path, capsys, monkeypatch):
    """``ctrl fit --print_config`` on each written config and its row's arguments (the reward is imported from
    benchmarks/, as the child runs find it through PYTHONPATH)."""
    from ctrl.commands import main

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    rows = [{"plugin": plugin, "args": [], "base": True} for plugin in vs_trl.BASE_ROWS]
    rows += [vs_trl.parse_extra("PPO:--model.algorithm.init_args.steps_per_call 5")]
    rows += [vs_trl.parse_extra("PPO:--model.algorithm.init_args.alpha 0.1")]
    vs_trl.write_configs(rows, str(tmp_path / "tiny-sd"), tmp_path / "configs")
    printed = []
    rows = [vs_trl.seeded(row, 3) for row in rows]  # as each repeat runs them
    for row in rows:
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", row["config"], *row["args"], "--print_config"])
        assert done.value.code == 0
        printed.append(yaml.safe_load(capsys.readouterr().out))
    # the seed reaches the weights' initialisation and the training chains alike, as trl's --seed does
    assert all(config["seed_everything"] == 3 and config["data"]["init_args"]["seed"] == 3 for config in printed)
    model = [config["model"]["init_args"] for config in printed]
    ppo, direct, steps, alpha = (m["algorithm"] for m in model)
    assert ppo["class_path"] == "ctrl.algorithms.PPO"
    assert model[0]["reward"]["class_path"] == "ctrl.rewards.JpegCompressibility"
    expected = {"alpha": 0.0, "clip_range": 1e-4, "minibatch_size": 2, "timestep_fraction": 1.0, "inner_epochs": 1}
    assert {k: ppo["init_args"][k] for k in expected} == expected
    assert direct["class_path"] == "ctrl.algorithms.DirectBackprop"
    assert model[1]["reward"]["class_path"] == "speed.ImageGradient"
    assert direct["init_args"]["alpha"] == 0.0 and direct["init_args"]["random_truncation"] is True
    assert model[1]["gradient_checkpointing"] is True and model[0]["gradient_checkpointing"] is False
    # optimizer steps per epoch as trl's: AlignProp one (2 batches accumulated), DDPO one per minibatch of 2
    assert model[1]["accumulate"] == 2 and model[0]["accumulate"] == 1
    assert model[0]["kl_log_interval"] is None and model[1]["kl_log_interval"] is None  # trl computes no KL
    # trl's LoRA start (A ~ N(0, 1/rank^2)) and AdamW weight decay (1e-4), on both workloads
    assert all(m["policy"]["init_args"]["lora_init"] == "gaussian" and m["weight_decay"] == 1e-4 for m in model)
    assert steps["init_args"]["steps_per_call"] == 5 and alpha["init_args"]["alpha"] == 0.1
    for config, m in zip(printed, model):
        assert (m["num_steps"], m["eta"], m["policy"]["init_args"]["guidance_scale"]) == (50, 1.0, 5.0)
        assert m["policy"]["init_args"]["lora_rank"] == 4 and config["trainer"]["precision"] == "32-true"
        assert m["policy"]["init_args"]["lora_target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
        data = config["data"]["init_args"]
        assert (data["batch_size"], data["batches_per_epoch"]) == (4, 2)
        # every epoch timed inside the process, as trl_peer.py times trl's
        [clock] = config["trainer"]["callbacks"]
        assert clock["class_path"] == "speed.EpochClock" and clock["init_args"]["path"] == vs_trl.EPOCH_TIMES


def test_the_epoch_clock_times_records_rewards_and_stops(tmp_path):
    """speed.EpochClock: each epoch's seconds and mean ``train/reward`` in its JSON, and a stop once the summed
    epoch time passes ``minutes`` (trl_peer.py's --minutes rule)."""
    import json
    from types import SimpleNamespace

    import speed

    trainer = SimpleNamespace(callback_metrics={}, should_stop=False)
    clock = speed.EpochClock(path=str(tmp_path / "epochs.json"), minutes=1e-9)
    clock.on_train_epoch_start(trainer, None)
    for reward in (1.0, 3.0):
        trainer.callback_metrics["train/reward"] = torch.tensor(reward)
        clock.on_train_batch_end(trainer, None, None, None, 0)
    clock.on_train_epoch_end(trainer, None)
    written = json.loads((tmp_path / "epochs.json").read_text())
    assert written["epoch_reward"] == [2.0] and len(written["epoch_s"]) == 1 and written["epoch_s"][0] >= 0
    assert trainer.should_stop


def test_time_to_reward_reads_the_rise_and_refuses_bad_input():
    import time_to_reward

    walls, rewards = [10.0, 10.0, 10.0, 10.0, 10.0], [0.0, 0.5, 1.0, 1.5, 2.0]
    # the mean of the last 2 epochs first reaches 0 + 1.0 after epoch 4 (1.0, 1.5): 40 s of training
    assert time_to_reward.time_to_rise(walls, rewards, rise=1.0, window=2) == 40.0
    assert time_to_reward.time_to_rise(walls, rewards, rise=5.0, window=2) is None
    summary = time_to_reward.summary([{"epoch_s": walls, "epoch_reward": rewards}] * 2, rise=1.0, window=2)
    assert summary["times"] == [40.0, 40.0] and summary["reached"] == 2 and summary["std_s"] == 0.0
    for argv, expected in (
        (["--rise", "1", "--minutes", "0"], "--minutes: a positive training time"),
        (["--rise", "1", "--seeds", "1", "1"], "--seeds: give distinct seeds"),
        (["--rise", "1", "--window", "0"], "--window and --threads: at least 1"),
        (
            ["--rise", "1", "--trl-extra", "dpo:--truncation last"],
            "--trl-extra 'dpo:--truncation last': 'dpo' is not a trainer of this workload",
        ),
        (["--rise", "1", "--trl-extra", "alignprop"], "--trl-extra 'alignprop': give TRAINER:ARGS, e.g."),
        (["--rise", "1", "--workloads"], "--workloads: none given and no --trl-extra or --ctrl-extra row"),
    ):
        with pytest.raises(SystemExit) as done:
            time_to_reward.main(argv)
        assert str(done.value.code).startswith("vs_trl: " + expected.split(":")[0]) and expected in str(
            done.value.code
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning-rate", "0"], "--learning-rate: a positive rate, got 0.0."),
        (["--trainer", "ddpo", "--truncation", "last"], "--truncation last: AlignProp's setting"),
    ],
)
def test_trl_peer_refuses_a_bad_setting_in_one_line_before_importing_trl(extra, message):
    """trl_peer.py checks its arguments before it imports torch or trl, so it answers here, in ctrl's venv."""
    args = ["--trainer", "alignprop", "--pipeline", "x", "--prompts", "[]", *extra]
    run = subprocess.run([sys.executable, str(BENCHMARKS / "trl_peer.py"), *args], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1], run.stderr
