"""The README's Python API example (the first ``python`` block under "## Python API") runs as printed, from an
empty folder, and is the same run as the quick CLI check it names: the same test figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctrl.commands import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_api_example() -> str:
    """The first fenced ``python`` block of the README's "## Python API" section."""
    text = README.read_text()
    assert "\n## Python API\n" in text, "the README has no '## Python API' section"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert found, "the README's Python API section has no python block"
    return found.group(1)


def test_the_python_api_example_runs_as_printed_and_is_the_quick_cli_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(python_api_example(), f"{README}: Python API", "exec"), namespace)
    assert (tmp_path / "runs/python-api/checkpoints/last.ckpt").is_file()
    python = {k: float(v) for k, v in namespace["trainer"].callback_metrics.items() if k.startswith("test/")}
    assert python["test/accuracy"] >= 0 and len(python) >= 6

    # the README says: the same run as `ctrl fit --config configs/digits/control.yaml --data.batches_per_epoch 2
    # --data.eval_per_label 2`
    config = ROOT / "configs" / "digits" / "control.yaml"
    quick = ["--data.batches_per_epoch", "2", "--data.eval_per_label", "2"]
    cli = main(["fit", "--config", str(config), *quick, "--trainer.default_root_dir", "runs/cli"])
    figures = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    assert figures == pytest.approx(python, rel=1e-5, abs=1e-6)
