"""The `ctrl` command end to end on a tiny setting: fit, validate, predict, and swapping by short name; its help,
version and `ctrl configs`."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import tiny_control_args
from PIL import Image

from ctrl.cli import console
from ctrl.commands import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_args(tmp_path, pretrained, classifier, *extra):
    """The tiny control run with the shipped config's own callbacks (its prediction grid into tmp_path)."""
    return [
        *tiny_control_args(tmp_path, pretrained, classifier),
        "--trainer.callbacks.path",
        str(tmp_path / "grid.png"),
        "--data.batches_per_epoch",
        "2",
        "--data.predict_per_label",
        "2",
        *extra,
    ]


def test_fit_validate_predict(tmp_path, tiny_pretrained, tiny_classifier):
    cli = main(["fit", *tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--model.eval_num_steps", "[3, 5]"])
    metrics = cli.trainer.callback_metrics
    for key in (
        "val/accuracy",
        "val/macro_f1",
        "val/frechet",
        "val/reward",
        "val/kl",
        "val/pretrained_accuracy",
        "val/pretrained_frechet",
        "val/steps_5/accuracy",
        "val/steps_5/reward",
    ):
        assert key in metrics, key
    assert 0 <= float(metrics["val/accuracy"]) <= 1 and float(metrics["val/frechet"]) >= 0
    assert float(metrics["val/kl"]) > 0  # two steps of training moved the policy
    # the config evaluates on the test seeds after fit (test_after_fit): other chains than validation's
    assert "test/accuracy" in metrics and "test/pretrained_frechet" in metrics
    assert float(metrics["test/pretrained_frechet"]) != float(metrics["val/pretrained_frechet"])
    ckpt = next((tmp_path).rglob("*.ckpt"))

    cli = main(["validate", *tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--ckpt_path", str(ckpt)])
    assert float(cli.trainer.callback_metrics["val/kl"]) == pytest.approx(float(metrics["val/kl"]), rel=1e-4)
    # The checkpoint's pretrained figures were sampled at 3 steps: validating at 5 samples them again, as a run
    # without the checkpoint does (the same pretrained weights and seeds), instead of showing the 3-step ones.
    at_5 = [*tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--model.eval_num_steps", "5"]
    resumed, fresh = main(["validate", *at_5, "--ckpt_path", str(ckpt)]), main(["validate", *at_5])
    baseline = resumed.model.baselines["val"]
    assert baseline["frechet"] != pytest.approx(float(metrics["val/pretrained_frechet"]))
    assert baseline == pytest.approx(fresh.model.baselines["val"], rel=1e-6)

    main(
        [
            "predict",
            *tiny_args(
                tmp_path,
                tiny_pretrained,
                tiny_classifier,
                "--data.predict_labels",
                "[1, 3, 7]",
                "--model.control_scale",
                "2.0",
            ),
            "--ckpt_path",
            str(ckpt),
        ]
    )
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 10 * 4, 3 * 10 * 4)  # 2 per label across, 3 labels down, 8 + 2 border px, scale 4


def test_algorithm_swapped_by_short_name_on_the_command_line(tmp_path, tiny_pretrained, tiny_classifier):
    args = tiny_args(tmp_path, tiny_pretrained, tiny_classifier)
    cli = main([*args, "--model.algorithm", "DirectBackprop", "--model.algorithm.alpha", "0.5"], run=False)
    algo = cli.model.algorithm
    assert type(algo).__name__ == "DirectBackprop" and algo.alpha == 0.5


def test_unknown_algorithm_lists_the_available_ones(tmp_path, tiny_pretrained, tiny_classifier, capsys):
    with pytest.raises(SystemExit):
        main([*tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--model.algorithm", "Nope"], run=False)
    err = capsys.readouterr().err
    assert "model.algorithm 'Nope' is not an available algorithm; available: " in err and "DirectBackprop" in err


def test_wrong_type_for_an_algorithm_setting_is_not_called_an_unknown_algorithm(
    tmp_path, tiny_pretrained, tiny_classifier, capsys
):
    with pytest.raises(SystemExit):
        main([*tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--model.algorithm.alpha", "abc"], run=False)
    err = capsys.readouterr().err
    assert "alpha" in err and "not an available algorithm" not in err


def test_help_is_ctrls_and_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        console(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: ctrl ") and "Lightning Trainer" not in out
    listed = re.findall(r"^    (\w+) ", out, re.M)
    assert listed == ["fit", "validate", "test", "predict", "benchmark", "configs", "export"]


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as stop:
        console(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.split() == ["ctrl", version("ctrl")]


def test_configs_copies_every_shipped_config_and_never_overwrites(tmp_path, capsys):
    shipped = sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.sbatch")])
    console(["configs", str(tmp_path / "new")])
    copied = sorted(p for p in (tmp_path / "new").rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path / "new") for p in copied] == [p.relative_to(CONFIGS) for p in shipped]
    assert all(c.read_bytes() == s.read_bytes() for c, s in zip(copied, shipped))

    mine = tmp_path / "mine" / "digits" / "control.yaml"  # a folder holding one edited config
    mine.parent.mkdir(parents=True)
    mine.write_text("edited")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        console(["configs", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("ctrl: error: ") and str(mine) in err
    assert [p for p in (tmp_path / "mine").rglob("*") if p.is_file()] == [mine] and mine.read_text() == "edited"


def test_an_export_to_a_shipped_name_outside_the_clone_says_which_file_configs_load(tmp_path, monkeypatch, capsys):
    """From an install's configs folder, ``ctrl fit --config configs/digits/classifier.yaml`` writes
    ./ctrl/weights/digits-classifier.safetensors, which ctrl:digits-classifier does not name there: a notice says
    so. In the clone (the same path is the shipped file) and for any other path, nothing is said."""
    from ctrl.assets import WEIGHTS_DIR, notice_if_shadowed

    monkeypatch.chdir(WEIGHTS_DIR.parents[1])  # the clone: the path is the shipped file itself
    notice_if_shadowed("ctrl/weights/digits-classifier.safetensors")
    notice_if_shadowed("runs/mine.safetensors")
    assert capsys.readouterr().err == ""
    monkeypatch.chdir(tmp_path)
    notice_if_shadowed("ctrl/weights/digits-classifier.safetensors")
    err = capsys.readouterr().err
    assert err.startswith(
        "ctrl: notice: ctrl/weights/digits-classifier.safetensors is not the file that "
        "ctrl:digits-classifier.safetensors names"
    )
    assert str(WEIGHTS_DIR / "digits-classifier.safetensors") in err


def test_a_step_budget_cut_short_by_the_epoch_budget_is_said(tmp_path, tiny_pretrained, tiny_classifier, capsys):
    """Lightning ends a fit at max_epochs even when max_steps asks for more: the configs' max_epochs 1 with 2 rollouts
    per epoch trains 2 steps of the 50 asked, and says so; a budget the epoch holds says nothing."""
    args = [*tiny_args(tmp_path, tiny_pretrained, tiny_classifier), "--model.eval_pretrained", "false"]
    main(["fit", *args, "--trainer.max_steps", "50"])
    err = capsys.readouterr().err
    assert "training stopped at trainer.max_epochs=1 after 2 optimizer steps, before trainer.max_steps=50" in err
    main(["fit", *args, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "b")])
    assert "trainer.max_steps=2:" not in capsys.readouterr().err
