"""The README's commands work as printed: every command of its fenced ``bash`` blocks runs, in the README's order,
from an empty folder (as after installing the wheel: the README's ``ctrl configs`` brings the configs), except the
long-running ones that SKIPPED matches. A new command is run unless a pattern there covers it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from ctrl.cli import console

README = Path(__file__).resolve().parents[1] / "README.md"

#: commands not run here (``re.match`` on the command's words joined by spaces) -> why
SKIPPED = {
    r"(python3 -m venv|\. \.venv/bin/activate|pip install)\b": "sets up an environment: .ci/run does that",
    r"(ruff|python -m pytest)\b": "the lint and the test suite: .ci/run runs them",
    r"sbatch ": "needs a SLURM cluster (tests/test_slurm.py runs the script on one)",
    r"ctrl benchmark ": "trains every plugin of a task: tens of minutes",
    r"ctrl \w+ --config configs/sd15/": "needs a GPU and Stable Diffusion's weights on disk",
    r"ctrl fit (?!.*(--data\.batches_per_epoch|--print_config))": "a whole training run: minutes",
    r"ctrl test ": "the whole test evaluation (500 samples, twice): about a minute on one thread",
}


def readme_commands() -> list[list[str]]:
    """The commands of the README's bash blocks as argument lists: continued lines joined, ``&&`` chains split,
    comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = []
            for word in [*shlex.split(line, comments=True), "&&"]:
                if word != "&&":
                    command.append(word)
                elif command:
                    commands.append(command)
                    command = []
    return commands


def skip_reason(command: list[str]) -> str | None:
    text = " ".join(command)
    return next((why for pattern, why in SKIPPED.items() if re.match(pattern, text)), None)


def run(command: list[str]) -> int:
    """Exit status of ``command``; ``ctrl`` runs in this process (one import of torch and Lightning for all)."""
    if command[0] != "ctrl":
        return subprocess.run(command).returncode
    try:
        console(command[1:])
    except SystemExit as stop:  # --help, --version, and every refusal
        return stop.code or 0
    return 0


def test_the_readme_has_commands_of_both_kinds():
    commands = readme_commands()
    assert any(skip_reason(c) is None for c in commands) and any(skip_reason(c) for c in commands)


def test_every_skip_pattern_matches_a_readme_command():
    texts = [" ".join(c) for c in readme_commands()]
    stale = [pattern for pattern in SKIPPED if not any(re.match(pattern, text) for text in texts)]
    assert not stale, f"SKIPPED patterns that match no README command: {stale}"


def test_quick_readme_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        if skip_reason(command) is None:
            status = run(command)
            assert status == 0, f"`{shlex.join(command)}` exited with {status}:\n{capsys.readouterr().err[-2000:]}"
