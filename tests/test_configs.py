"""Every shipped config parses and instantiates (litgpt's rule: an untested config is a broken config).

The sd15 and sd3 configs name Stable Diffusion 1.5 / 3.5 and the aesthetic weights, which cannot be fetched
here: their instantiation swaps in the tiny local components (conftest), everything else as shipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrl.commands import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


def _tiny_components(config: Path, request) -> list[str]:
    pipelines = {"sd15": "tiny_sd", "sd3": "tiny_sd3"}
    if config.parent.name not in pipelines:
        return []
    swaps = [
        "--model.policy.pretrained",
        request.getfixturevalue(pipelines[config.parent.name]),
        "--model.policy.dtype",
        "float32",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
    ]
    if config.parent.name == "sd3":  # the tiny transformer's images (16 pixels), not the config's 512
        swaps += ["--model.policy.resolution", "16"]
    reward = config.read_text()
    if "ClassifierLogProb" in reward:
        return swaps + ["--model.reward.path", request.getfixturevalue("tiny_rgb_classifier")]
    if "PickScore" in reward or "CLIPScore" in reward:
        clip = request.getfixturevalue("tiny_clip")
        return swaps + ["--model.reward.model", clip, "--model.reward.processor", clip]
    if "AestheticScore" not in reward:  # a reward without weights (JPEG compressibility)
        return swaps
    clip, mlp = request.getfixturevalue("tiny_aesthetic")
    return swaps + ["--model.reward.clip_model", clip, "--model.reward.mlp_path", mlp]


def _is_benchmark(config: Path) -> bool:
    """A `ctrl benchmark` config or overlay (not a fit config)."""
    return config.name.startswith(("benchmark_", "labelled_curve"))


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if not _is_benchmark(c)], ids=lambda p: str(p.relative_to(p.parents[1]))
)
def test_config_instantiates(config, tmp_path, request):
    # a task overlay (configs/digits/tasks/) goes after the main control config, as its header says
    base = ["--config", str(config.parents[1] / "control.yaml")] if config.parent.name == "tasks" else []
    cli = main(
        [
            *base,
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            *_tiny_components(config, request),
        ],
        run=False,
    )
    assert cli.model is not None and cli.datamodule is not None
    assert cli.trainer.max_epochs or cli.trainer.max_steps


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name.startswith("benchmark_")], ids=lambda p: p.name)
def test_benchmark_config_parses_and_every_row_instantiates(config, tmp_path, monkeypatch):
    from ctrl.benchmark import _check_rows, _plan, _setting_module, parse
    from ctrl.inference_time import GuidedSampler

    monkeypatch.chdir(config.parents[2])  # rows name their configs relative to the repository
    spec = parse(["--config", str(config)])
    steps = config.name == "benchmark_steps.yaml"  # fine-tuning rows only, trained at 50 steps
    spec["baseline_models"], spec["inference_time"] = spec["baseline_models"] or [], spec["inference_time"] or []
    assert spec["fine_tuning"] and all(isinstance(g, GuidedSampler) for g in spec["inference_time"])
    # classifier-free guidance's training config instantiates too
    assert [m.name for m in spec["baseline_models"]] == ([] if steps else ["ClassifierFreeGuidance"])
    for cli in _check_rows(spec["fine_tuning"], spec["inference_time"], spec["baseline_models"], tmp_path):
        assert cli.model.evaluator is not None and cli.datamodule.num_labels == cli.model.policy.num_labels
        assert cli.model.eval_num_steps == (50 if steps else 10)
        assert cli.model.extra_eval_num_steps == ([25, 100] if steps else [])
    # every swept setting instantiates (its overrides name real settings) at the one target
    args = [spec[k] for k in ("fine_tuning", "inference_time", "baseline_models")]
    plan = _plan(*args, tmp_path, False, spec["training_seeds"], spec["inference_sweeps"] or {})
    for run in spec["fine_tuning"]:
        for k in range(len(run.settings())):
            module = _setting_module(plan, run, k)
            assert (module.algorithm.alpha, module.algorithm.off_target(), module.control_scale) == (0.2, None, 1.0)
    assert all(v.target_alpha() in (None, 0.2) for vs in plan.variants.values() for v in vs)


@pytest.mark.parametrize(
    "overlay, benchmark, per_class",
    [
        ("labelled_curve.yaml", "benchmark_class.yaml", [10.0, 20.0, 35.0]),  # 350 images, 10 classes
        ("labelled_curve_compressibility.yaml", "benchmark_compressibility.yaml", [10.0, 30.0, 57.0]),  # 64 + 50
    ],
)
def test_a_labelled_curve_overlay_checks_every_size(overlay, benchmark, per_class, monkeypatch):
    """A curve overlay after its benchmark: every row, and the reward classifier and classifier-free guidance's
    model at each size, instantiate before anything trains; null sits at the split's images per class."""
    from ctrl.benchmark import _check_curve, parse

    digits = Path(__file__).resolve().parents[1] / "configs" / "digits"
    monkeypatch.chdir(digits.parents[1])
    spec = parse(["--config", str(digits / benchmark), "--config", str(digits / overlay)])
    sizes, classifiers = spec.pop("labelled_per_class"), spec.pop("reward_classifiers")
    assert sizes[-1] is None and len(classifiers) == 1
    assert _check_curve(sizes, classifiers, spec) == per_class
