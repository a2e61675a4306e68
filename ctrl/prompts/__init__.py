"""Prompt lists: files of one prompt per line, shipped ones named ``ctrl:<name>`` (e.g. ``ctrl:animals``).

``animals.txt`` is the common-animals list of DDPO (Black et al. 2024) and the conditional-control
paper's Stable Diffusion experiments: 45 one-word prompts.
"""

from __future__ import annotations

from pathlib import Path

from ctrl.assets import PROMPTS_DIR, resolve_path, shipped


def load_prompts(prompts: str | list[str]) -> list[str]:
    """The prompts named by ``prompts``: a list of strings, a text file of one prompt per line (blank
    lines and lines starting with ``#`` are skipped), or ``ctrl:<name>`` for a shipped list.

    One clear message when the file is missing (FileNotFoundError) or holds no prompt (ValueError); the class
    whose setting gave ``prompts`` names it (``ctrl.errors.setting``).
    """
    if isinstance(prompts, list):
        found, where = [p.strip() for p in prompts if p.strip()], "the list"
    else:
        path = Path(resolve_path(prompts, PROMPTS_DIR, ".txt"))
        if not path.is_file():
            lists = ", ".join(shipped(PROMPTS_DIR, ".txt"))
            raise FileNotFoundError(
                f"no prompt file at '{prompts}'; give a text file with one prompt per "
                f"line, a list of prompts, or a shipped list ({lists})."
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        found, where = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")], f"'{prompts}'"
    if not found:
        raise ValueError(f"{where} holds no prompt; write one prompt per line.")
    return found
