"""`ctrl benchmark` on tiny models: every method's row is there with numbers in range, the table, CSV and
figure are written, and a bad benchmark config is refused in one line before any training."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_classifier

from ctrl.benchmark import main as benchmark
from ctrl.cli import console
from ctrl.seeds import TEST

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"


TASKS = {"class": 10, "compressibility": 2, "multitask": 4}


# the shipped PPO config's standardised, clipped advantages aim elsewhere than the tilt (Algorithm.off_target)
EXACT_PPO = ["--model.algorithm", json.dumps({"init_args": {"advantages": "center", "advantage_clip": None}})]

SCALE_1 = ["--model.control_scale", "1.0"]


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
            make_tiny_classifier(tmp_path / "compress.safetensors", num_labels=2),
        ]
    else:  # the two classifiers of the joint reward, swapped in by an overlay of its own
        rewards = [
            {
                "class_path": "ctrl.rewards.ClassifierLogProb",
                "init_args": {"path": make_tiny_classifier(tmp_path / f"{name}.safetensors", num_labels=n)},
            }
            for name, n in (("compress", 2), ("ink", 2))
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
            # the shipped config samples at control scale 0.9; rows are compared at the trained tilt, 1
            {"name": "DirectBackprop", "config": str(CONFIGS / "control.yaml"), "args": [*tiny, *SCALE_1]},
            {"name": "PPO", "config": str(CONFIGS / "ppo.yaml"), "args": [*tiny, *EXACT_PPO]},
        ],
        "inference_time": [
            {"class_path": f"ctrl.inference_time.{name}", "init_args": args}
            for name, args in [
                ("ClassifierFreeGuidance", {"scale": 5.0}),  # the fine-tuning rows' target: alpha 0.2
                ("ReconstructionGuidance", {"scale": 5.0}),
                ("MPGD", {"step_size": 0.5}),
                ("SVDD", {"num_candidates": 3, "temperature": 0.2}),
                ("SMC", {"num_particles": 3, "alpha": 0.2}),
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
            r"seed=5 gives test seeds \[5, 9\) outside the test range",
        ),
        (
            "SMC at another target than the fine-tuning rows",
            lambda c: c["inference_time"][4]["init_args"].update(alpha=1.0),
            r"SMC\.alpha: 1 aims at another target \(KL weight 1\) than the fine-tuning rows \(alpha 0\.2\); "
            r"set alpha: 0\.2 to compare at one target, or same_target: false",
        ),
        (
            "a guidance scale at another target",
            lambda c: c["inference_time"][0]["init_args"].update(scale=3.0),
            r"ClassifierFreeGuidance\.scale: 3 aims at another target \(KL weight 0\.333333\) .* set scale: 5 ",
        ),
        (
            "a fine-tuning row at another KL weight",
            lambda c: c["fine_tuning"][1].update(
                args=[*c["fine_tuning"][1]["args"], "--model.algorithm.alpha", "0.1"]
            ),
            r"fine_tuning 'PPO': model\.algorithm\.alpha=0\.1, but the first row has 0\.2",
        ),
        (
            "a fine-tuning row whose optimum is not the tilt",
            lambda c: c["fine_tuning"][1]["args"].extend(["--model.algorithm.init_args.advantages", "standardize"]),
            r"fine_tuning 'PPO': model\.algorithm\.advantages=standardize divides each return by its group's spread.* "
            r"set advantages: center \(methods are compared at one target, the tilt at alpha 0\.2",
        ),
        (
            "a swept setting whose optimum is not the tilt",
            lambda c: c["fine_tuning"][1].update(sweep=[[], ["--model.algorithm.init_args.advantage_clip", "5"]]),
            r"fine_tuning 'PPO' \(setting 1\): model\.algorithm\.advantage_clip=5 caps each advantage",
        ),
        (
            "a fine-tuning row sampled at another control scale",
            lambda c: c["fine_tuning"][0]["args"].extend(["--model.control_scale", "0.9"]),
            r"fine_tuning 'DirectBackprop': model\.control_scale=0\.9 samples another tilt than the one trained for",
        ),
        (
            "an empty sweep",
            lambda c: c["fine_tuning"][1].update(sweep=[]),
            r"fine_tuning 'PPO'\.sweep: an empty sweep; give at least one setting",
        ),
        (
            "more settings than the tuning budget",
            lambda c: c["fine_tuning"][0].update(sweep=[[]] * 7),
            r"fine_tuning 'DirectBackprop'\.sweep: 7 settings; at most 6, the same tuning budget for every method",
        ),
        (
            "a sweep of a method the benchmark does not run",
            lambda c: c.update(inference_sweeps={"Telepathy": [{}]}),
            r"inference_sweeps: 'Telepathy' is not one of the inference_time methods",
        ),
        (
            "a swept setting that leaves the target",
            lambda c: c.update(inference_sweeps={"SVDD": [{"temperature": 0.2}, {"temperature": 0.0}]}),
            r"SVDD\.temperature: 0 aims at another target \(KL weight 0\)",
        ),
        (
            "a swept fine-tuning setting at another KL weight",
            lambda c: c["fine_tuning"][1].update(sweep=[[], ["--model.algorithm.init_args.alpha", "0.5"]]),
            r"fine_tuning 'PPO' \(setting 1\): model\.algorithm\.alpha=0\.5, but the first row has 0\.2",
        ),
        (
            "training seeds given twice",
            lambda c: c.update(training_seeds=[0, 0]),
            r"training_seeds: give distinct seeds, got \[0, 0\]",
        ),
        (
            "validation seeds outside their set",
            lambda c: c.update(validation_seed=2**30, inference_sweeps={"SMC": [{}, {"num_particles": 2}]}),
            r"validation_seed=1073741824 gives validation seeds \[1073741824, 1073741828\) outside the validation",
        ),
        (
            "labelled-data size larger than a class of the split",
            lambda c: c.update(labelled_per_class=[10, 40], reward_classifiers=[_tiny_reward_classifier()]),
            r"labelled_per_class: 40 is refused by 'reward_classifier' \(data.labelled_per_class: 40 labelled images",
        ),
        (
            "a reward classifier named like a row",
            lambda c: c.update(
                labelled_per_class=[10], reward_classifiers=[{**_tiny_reward_classifier(), "name": "PPO"}]
            ),
            r"reward_classifiers: names \['PPO'\] must differ from each other and from the rows",
        ),
        (
            "reward classifiers without the curve",
            lambda c: c.update(reward_classifiers=[_tiny_reward_classifier()]),
            "reward_classifiers: only the labelled-data curve has sizes; give labelled_per_class too",
        ),
        (
            "tuning at each size without the curve",
            lambda c: c.update(tune_each_size=True),
            "tune_each_size: only the labelled-data curve has sizes; give labelled_per_class too",
        ),
        (
            "a bad test seed with the curve (refused before any classifier trains)",
            lambda c: c.update(labelled_per_class=[10], reward_classifiers=[_tiny_reward_classifier()], seed=5),
            r"seed=5 gives test seeds",
        ),
        (
            "a step count listed twice",
            lambda c: c["fine_tuning"][0]["args"].extend(["--model.eval_num_steps", "[3, 2, 2]"]),
            r"model.eval_num_steps: give distinct step counts, got \[3, 2, 2\]",
        ),
        (
            "prior that does not sum to one",
            lambda c: c["fine_tuning"][1]["args"].extend(["--data.prior", "[0.5, 0.4]"]),
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
    assert not list(Path(config["output"]).glob("labelled_*"))  # no size of a curve trained anything


def test_settings_are_chosen_on_validation_and_repeats_give_the_spread(tmp_path, tiny_pretrained, monkeypatch):
    """Two settings of a fine-tuning row and of an inference-time method tried on validation seeds, one kept by
    the rule; then two repeats (training seeds 0 and 1, each on its own test seeds): mean and std per method. Run
    again, it resumes from what it kept (:func:`_resumes`)."""
    from ctrl.tuning import choose

    path, config = _tiny_config(tmp_path, tiny_pretrained, "class")
    row = config["fine_tuning"][0]
    row["args"] = [*row["args"], "--model.eval_num_steps", "[3, 2]"]  # sampled at 2 steps as well
    config["fine_tuning"] = [{**row, "sweep": [[], ["--model.policy.head_lr", "0.02"]]}]
    kept = ("ClassifierFreeGuidance", "MPGD", "SMC")  # the first with its model, trained here
    config["inference_time"] = [m for m in config["inference_time"] if m["class_path"].endswith(kept)]
    config.update(
        control_scales=[],
        training_seeds=[0, 1],
        inference_sweeps={"SMC": [{}, {"num_particles": 2}]},
    )
    path.write_text(yaml.safe_dump(config))
    rows = benchmark(["--config", str(path)])
    methods = ["pretrained", "pretrained steps=2", "ClassifierFreeGuidance", "MPGD", "SMC"]
    methods += ["DirectBackprop", "DirectBackprop steps=2"]
    assert [r["method"] for r in rows] == methods
    assert all(r["repeats"] == 2 for r in rows)
    out = Path(config["output"])
    with open(out / "results.csv") as f:
        raw = list(csv.DictReader(f))
    assert [(r["repeat"], r["method"]) for r in raw] == [(str(k), r["method"]) for k in (0, 1) for r in rows]
    pretrained = [float(r["frechet"]) for r in raw if r["method"] == "pretrained"]
    assert pretrained[0] != pretrained[1]  # each repeat samples its own test seeds
    assert rows[0]["frechet"] == pytest.approx(sum(pretrained) / 2) and rows[0]["frechet_std"] > 0
    with open(out / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    for method in ("SMC", "DirectBackprop"):
        tried = [r for r in sweep if r["method"] == method]
        assert len(tried) == 2 and sum(r["chosen"] == "True" for r in tried) == 1
        base = float(tried[0]["frechet"]) / float(tried[0]["frechet_ratio"])  # the pretrained model's, validation
        accuracy, frechet = [float(r["accuracy"]) for r in tried], [float(r["frechet"]) for r in tried]
        k = choose(accuracy, frechet, base, 1.5)
        assert tried[k]["chosen"] == "True"
        assert {r["method"]: r.get("setting") for r in rows}[method] == tried[k]["setting"]
    k = [r["chosen"] for r in sweep if r["method"] == "DirectBackprop"].index("True")
    runs = out / "runs" / "DirectBackprop"
    assert (runs / "setting_0" / "seed_0").is_dir() and (runs / "setting_1" / "seed_0").is_dir()
    assert (runs / f"setting_{k}" / "seed_1").is_dir() and not (runs / f"setting_{1 - k}" / "seed_1").exists()
    assert "chosen: the highest accuracy with Frechet <= 1.5x" in (out / "sweep.md").read_text()
    # UNet calls counted by a hook: 3 steps, one call each (the residual head reads the pretrained eps it gives)
    calls = {r["method"]: r["denoiser_calls_per_image"] for r in rows}
    assert calls["pretrained"] == calls["DirectBackprop"] == 3 and calls["SMC"] == 3 * 3  # 3 particles
    assert calls["pretrained steps=2"] == calls["DirectBackprop steps=2"] == 2  # eval_num_steps [3, 2]: 2 steps too
    for figure in ("accuracy_frechet.png", "accuracy_calls.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    assert (out / "rows" / "fits" / "DirectBackprop" / f"setting_{k}" / "seed_1.json").is_file()
    # both settings' first-repeat test rows were sampled right after each was trained: none needs its checkpoint
    first = out / "rows" / f"seed_{TEST.start + 123_456}_per_label_2_steps_3_eta_1"
    kept = [torch.load(f, weights_only=True)["key"] for f in first.glob("*.pt")]
    assert sorted(key.split(" config ")[0] for key in kept if key.startswith("DirectBackprop")) == [
        "DirectBackprop",
        "DirectBackprop",
        "DirectBackprop steps=2",
        "DirectBackprop steps=2",
    ]
    _resumes(path, config, raw, out / "rows" / "fits" / "DirectBackprop" / f"setting_{k}" / "seed_1.json", monkeypatch)


def _resumes(path, config, raw: list[dict], chosen_fit: Path, monkeypatch) -> None:
    """The same benchmark run again samples nothing and trains nothing (every row and fit was kept) and writes the
    same figures, also from a clone that has ``rows/`` but not ``runs/`` (no checkpoint is read); with one method's
    setting changed, only that method's rows are sampled anew."""
    from ctrl import benchmark as module

    sampled, draw = [], module._Table.draw
    monkeypatch.setattr(module._Table, "draw", lambda table, name, d: sampled.append(name) or draw(table, name, d))
    cli = module.FitRun.cli

    def no_fit(run, folder, subcommand=None, *extra):
        assert subcommand is None, f"{run.name}: {subcommand} (every row was kept: nothing to train or reload)"
        return cli(run, folder, subcommand, *extra)

    monkeypatch.setattr(module.FitRun, "cli", no_fit)
    benchmark(["--config", str(path)])
    assert sampled == []
    with open(Path(config["output"]) / "results.csv") as f:
        assert list(csv.DictReader(f)) == raw  # every figure, the sampling seconds too
    samples = (Path(config["output"]) / "samples.png").read_bytes()
    shutil.rmtree(Path(config["output"]) / "runs")  # another machine: the committed rows/ only, no model there
    benchmark(["--config", str(path)])
    assert sampled == []
    with open(Path(config["output"]) / "results.csv") as f:
        assert list(csv.DictReader(f)) == raw
    assert (Path(config["output"]) / "samples.png").read_bytes() == samples  # drawn from the rows' 8-bit panels
    config["inference_time"] = [
        {**m, "init_args": {"step_size": 0.25}} if m["class_path"].endswith("MPGD") else m
        for m in config["inference_time"]
    ]
    path.write_text(yaml.safe_dump(config))
    benchmark(["--config", str(path)])
    assert sampled == ["MPGD", "MPGD"]  # one per repeat
    # A fit trained again (its mark of done gone) is a new model: its rows are sampled anew, nobody else's
    chosen_fit.unlink()  # the chosen setting's second training seed: the only one with a seed_1
    sampled.clear()
    monkeypatch.setattr(module.FitRun, "cli", cli)  # that fit trains
    benchmark(["--config", str(path)])
    assert sampled == ["DirectBackprop", "DirectBackprop steps=2"]  # repeat 1's rows, trained with seed 1
    # a row of a model that is not on this machine (runs/ went above): one message naming the file to delete
    rows = (Path(config["output"]) / "rows").rglob("*.pt")
    next(f for f in rows if torch.load(f, weights_only=True)["key"].startswith("ClassifierFree")).unlink()
    expected = (
        r"ClassifierFreeGuidance's model was trained on another machine \(rows/fits/ClassifierFreeGuidance\.json"
    )
    with pytest.raises(FileNotFoundError, match=expected + r".* delete that file to train it again"):
        benchmark(["--config", str(path)])
    # --retrain true: every model trained again, once (the model itself, two settings, the chosen one's seed 1),
    # and every row sampled again, once (read back where a repeat needs it after the sweep sampled it)
    fits, start = [], time.time_ns()

    def counted(run, folder, subcommand=None, *extra):
        fits.append(subcommand)
        return cli(run, folder, subcommand, *extra)

    monkeypatch.setattr(module.FitRun, "cli", counted)
    sampled.clear()
    benchmark(["--config", str(path), "--retrain", "true"])
    assert [s for s in fits if s is not None] == ["fit"] * 4  # nothing reloaded either
    rows = list((Path(config["output"]) / "rows").rglob("*.pt"))
    # 5 validation rows, 6 inference-time test rows, 4 + 2 + 4 rows of repeats 0 and 1
    assert len(sampled) == sum(f.stat().st_mtime_ns >= start for f in rows) == 21


def _tiny_reward_classifier() -> dict:
    """configs/digits/classifier.yaml at 8x8, width 4, one epoch: the curve's reward classifier."""
    args = "--data.image_size 8 --model.width 4 --trainer.max_epochs 1 --trainer.logger false".split()
    return {"name": "reward_classifier", "config": str(CONFIGS / "classifier.yaml"), "args": args}


def test_the_labelled_data_curve_cuts_the_classifier_and_the_cfg_model_alike(tmp_path, tiny_pretrained):
    """At a cut size the reward classifier and classifier-free guidance's model learn from the same first n
    images per class, the fine-tuning row is rewarded by that size's classifier, and every method runs only at
    the setting it kept on the whole set (the task as configured, in the output folder itself)."""
    from safetensors.torch import load_file

    path, config = _tiny_config(tmp_path, tiny_pretrained, "class")
    config["fine_tuning"] = config["fine_tuning"][:1]
    config["fine_tuning"][0]["sweep"] = [[], ["--model.policy.head_lr", "0.02"]]
    config["inference_time"] = [config["inference_time"][0], config["inference_time"][2]]  # CFG, MPGD
    config["inference_sweeps"] = {"MPGD": [{"step_size": 0.5}, {"step_size": 2.0}]}
    config.update(control_scales=[], labelled_per_class=[2, None], reward_classifiers=[_tiny_reward_classifier()])
    path.write_text(yaml.safe_dump(config))
    rows = benchmark(["--config", str(path)])
    out, cut = Path(config["output"]), Path(config["output"]) / "labelled_2"
    methods = ("pretrained", "ClassifierFreeGuidance", "MPGD", "DirectBackprop")
    assert [(r["labelled_per_class"], r["method"]) for r in rows] == [(s, m) for s in ("2", "all") for m in methods]
    # 350 labelled images in the classifier split, 10 classes: "all" sits at 35 per class
    assert {r["labelled_per_class"]: r["labelled_images"] for r in rows} == {"2": 2.0, "all": 35.0}
    setting = {(r["labelled_per_class"], r["method"]): r.get("setting") for r in rows}
    assert all(setting["2", m] == setting["all", m] for m in ("MPGD", "DirectBackprop"))
    assert (out / "sweep.md").is_file() and not (cut / "sweep.md").exists()  # tried on the whole set only
    assert len(list((out / "runs" / "DirectBackprop").glob("setting_*"))) == 2
    assert len(list((cut / "runs" / "DirectBackprop").glob("setting_*"))) == 1
    classifier = cut / "rows" / "fits" / "reward_classifier" / "classifier.safetensors"  # kept with the rows
    whole = str(tmp_path / "class.safetensors")  # the tiny task's own classifier
    assert set(load_file(str(classifier))) == set(load_file(whole))
    learnt = yaml.safe_load((cut / "runs" / "reward_classifier" / "config.yaml").read_text())
    assert learnt["data"]["init_args"]["labelled_per_class"] == 2
    for folder, reward, per_class in [(cut, str(classifier), 2), (out, whole, None)]:
        fit = yaml.safe_load(next((folder / "runs" / "DirectBackprop").rglob("config.yaml")).read_text())
        assert fit["model"]["init_args"]["reward"]["init_args"]["path"] == reward
        cfg = yaml.safe_load((folder / "runs" / "ClassifierFreeGuidance" / "config.yaml").read_text())
        assert cfg["data"]["init_args"]["labelled_per_class"] == per_class
        assert (folder / "table.md").is_file()
    curve = (out / "curve.md").read_text()
    assert "| method | 2 per class | all per class |" in curve and "| DirectBackprop |" in curve
    assert (out / "accuracy_labelled.png").read_bytes()[:4] == b"\x89PNG"
    # the classifier's config edited: it trains again at the cut size, and so does the size's fit, rewarded by the
    # old file (the fit's mark holds the file's bytes); classifier-free guidance's model learns from the same images
    # as before and is kept
    fits = cut / "rows" / "fits"
    record, cfg_record = next((fits / "DirectBackprop").rglob("*.json")), fits / "ClassifierFreeGuidance.json"
    before, cfg_before, weights = record.read_text(), cfg_record.read_text(), classifier.read_bytes()
    config["reward_classifiers"][0]["args"] += ["--model.width", "5"]
    path.write_text(yaml.safe_dump(config))
    benchmark(["--config", str(path)])
    assert classifier.read_bytes() != weights and load_file(str(classifier))["net.0.weight"].shape[0] == 5
    assert record.read_text() != before and cfg_record.read_text() == cfg_before
    # a mark written before marks held their inputs counts as the same fit: nothing trains again
    legacy = {"seconds": json.loads(record.read_text())["seconds"]}
    record.write_text(json.dumps(legacy))
    benchmark(["--config", str(path)])
    assert json.loads(record.read_text()) == legacy
    # a mark of other weights (the pretrained model or the reward replaced under a name that no argument gives,
    # such as ctrl:digits-classifier, so the inputs alone would not tell) trains again
    whole_record = sorted((out / "rows" / "fits" / "DirectBackprop").rglob("*.json"))[0]
    mark = json.loads(whole_record.read_text())
    assert len(mark["weights"]) == 16
    whole_record.write_text(json.dumps({**mark, "weights": "0" * 16}))
    benchmark(["--config", str(path)])
    again = json.loads(whole_record.read_text())
    assert again["weights"] == mark["weights"] and again["seconds"] != mark["seconds"]
    # a clone with the rows but not the cut size's model, and its rows missing: the whole set's model (loaded first,
    # the largest size runs first) must not sample them; one message names the file to delete
    shutil.rmtree(cut / "runs" / "ClassifierFreeGuidance")
    for row in (cut / "rows").rglob("*.pt"):
        if torch.load(row, weights_only=True)["key"].startswith("ClassifierFree"):
            row.unlink()
    with pytest.raises(FileNotFoundError, match=r"ClassifierFreeGuidance's model was trained on another machine"):
        benchmark(["--config", str(path)])


def test_the_tuning_rule():
    from ctrl.tuning import choose

    # the most accurate within 1.5x the base's Frechet; none within: the most accurate; ties: the first listed
    assert choose([0.9, 0.8, 0.95], [3.1, 2.9, 4.0], base_frechet=2.0, max_frechet_ratio=1.5) == 1
    assert choose([0.9, 0.8], [3.1, 3.2], base_frechet=2.0, max_frechet_ratio=1.5) == 0
    assert choose([0.7, 0.7], [1.0, 1.0], base_frechet=2.0, max_frechet_ratio=1.5) == 0
    with pytest.raises(ValueError, match="one accuracy and one Frechet distance per setting"):
        choose([], [], 1.0, 1.5)


def test_a_method_that_does_not_keep_a_setting_is_refused():
    """Each setting of a sweep rebuilds its method from the settings read back from the instance: one kept under
    another name would silently fall back to its default, so it is refused; an old name defaulting to None (SMC's
    lam) is not needed."""
    from ctrl.benchmark import _variants
    from ctrl.inference_time import SMC, SVDD

    class Renamed(SVDD):
        def __init__(self, num_candidates: int = 4, temperature: float = 0.2, width: int = 3):
            super().__init__(num_candidates, temperature)
            self.w = width

    with pytest.raises(ValueError, match=r"^inference_time Renamed: .* keeps no attribute 'width'; store it as self"):
        _variants(Renamed(width=5), [{"temperature": 0.1}])
    kept = _variants(SMC(num_particles=3, alpha=0.5), [{}, {"num_particles": 5}])
    assert [(s.num_particles, s.alpha) for s in kept] == [(3, 0.5), (5, 0.5)]


def test_a_setting_that_diverges_is_tried_and_lost_and_the_benchmark_goes_on(tmp_path, tiny_pretrained):
    """A sweep setting whose fit stops itself (rewards NaN: it diverged) used to end the whole benchmark. Its
    validation row is kept without figures, the rule passes over it (listed first, it would win a max over NaN),
    the kept setting's repeats run, and a second run reads the divergence back instead of training again."""
    path, config = _tiny_config(tmp_path, tiny_pretrained, "class")
    row = config["fine_tuning"][0]
    blow_up = ["--model.policy.head_lr", "1.0e+30", "--model.policy.bias_lr", "1.0e+30", "--model.max_bad_steps", "1"]
    config["fine_tuning"] = [{**row, "sweep": [blow_up, []]}]
    config["inference_time"] = [m for m in config["inference_time"] if m["class_path"].endswith("MPGD")]
    config.update(control_scales=[], training_seeds=[0, 1], baseline_models=[])
    path.write_text(yaml.safe_dump(config))
    rows = benchmark(["--config", str(path)])
    fitted = {r["method"]: r for r in rows}["DirectBackprop"]
    assert fitted["repeats"] == 2 and 0 <= fitted["accuracy"] <= 1 and fitted["diverged"] == 0.0
    out = Path(config["output"])
    with open(out / "sweep.csv") as f:
        tried = [r for r in csv.DictReader(f) if r["method"] == "DirectBackprop"]
    assert [r["chosen"] for r in tried] == ["False", "True"] and tried[0]["accuracy"] == "nan"
    assert "| diverged |" in (out / "sweep.md").read_text().splitlines()[2]
    mark = json.loads(next((out / "rows" / "fits").rglob("setting_0/seed_0.json")).read_text())
    assert "NaN or Inf" in mark["diverged"]
    assert benchmark(["--config", str(path)]) == rows


def test_repeats_that_diverged_are_counted_not_averaged():
    from ctrl.benchmark import aggregate

    rows = [
        {"method": "PPO", "accuracy": 0.8, "frechet": 2.0, "diverged": 0.0},
        {"method": "PPO", "accuracy": math.nan, "frechet": math.nan, "diverged": 1.0},
        {"method": "PPO", "accuracy": 0.6, "frechet": 4.0, "diverged": 0.0},
    ]
    (ppo,) = aggregate(rows)
    assert ppo["accuracy"] == pytest.approx(0.7) and ppo["frechet"] == pytest.approx(3.0)
    assert ppo["diverged"] == pytest.approx(1 / 3) and ppo["repeats"] == 3
    (gone,) = aggregate([{**rows[1], "method": "RAFT"}])
    assert math.isnan(gone["accuracy"]) and gone["diverged"] == 1.0
