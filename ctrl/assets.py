"""What ships inside the package: weights (``ctrl/weights``) and prompt lists (``ctrl/prompts``), named
``ctrl:<name>`` in configs."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "ctrl:"
PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
PROMPTS_DIR = PACKAGE_DIR / "prompts"


def is_builtin(path: str) -> bool:
    return isinstance(path, str) and path.startswith(BUILTIN_PREFIX)


def resolve_path(path: str, folder: Path = WEIGHTS_DIR, suffix: str = "") -> str:
    """``ctrl:<name>`` -> ``<folder>/<name><suffix>`` (weights by default); any other path is kept."""
    if is_builtin(path):
        return str(folder / f"{path[len(BUILTIN_PREFIX) :]}{suffix}")
    return path


def local_directory(path: str, what: str, hint: str) -> Path | None:
    """The folder ``path`` names when it is local (it exists, or is written as a path: ``/...``, ``./...``);
    None for a hub id (diffusers resolves those, from its cache when offline). A local path that is not a
    folder is a FileNotFoundError: "no <what> directory at '<path>'; <hint>."."""
    local = Path(path)
    if not (local.exists() or path.startswith(("/", "."))):
        return None
    if not local.is_dir():
        raise FileNotFoundError(f"no {what} directory at '{path}'; {hint}.")
    return local


def shipped(folder: Path = WEIGHTS_DIR, suffix: str = "") -> list[str]:
    """The shipped assets of ``folder`` (files ending in ``suffix``, or directories), as ``ctrl:<name>``."""
    names = [
        p.name[: len(p.name) - len(suffix)]
        for p in folder.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith(("_", "."))
    ]
    return sorted(f"{BUILTIN_PREFIX}{n}" for n in names)
