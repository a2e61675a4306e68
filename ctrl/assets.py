"""What ships inside the package: weights (``ctrl/weights``) and prompt lists (``ctrl/prompts``), named
``ctrl:<name>`` in configs; and the configs themselves (the repository's ``configs/``, installed as the data
package ``ctrl.configs``), which :func:`copy_configs` copies out."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

from ctrl.errors import notice

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


def shadowed_asset(path: str | Path) -> str | None:
    """``ctrl:<name>`` when ``path`` is where the repository keeps a shipped asset (``ctrl/weights/<name>``,
    relative to the working directory) but not the file this installed package reads for that name: a shipped
    config's export written outside a clone (an installed wheel), which ``ctrl:<name>`` will not load."""
    parts = Path(path).parts
    if len(parts) < 3 or parts[:2] != ("ctrl", "weights"):
        return None
    if Path(path).resolve() == (WEIGHTS_DIR / Path(*parts[2:])).resolve():
        return None
    return f"{BUILTIN_PREFIX}{Path(*parts[2:]).as_posix()}"


def notice_if_shadowed(written: str | Path) -> None:
    """Say so when an export lands where a clone keeps a shipped asset but this install reads that name from
    elsewhere (:func:`shadowed_asset`): configs that name it would go on loading the shipped file."""
    name = shadowed_asset(written)
    if name is not None:
        notice(
            f"{written} is not the file that {name} names in this install ({resolve_path(name)}): configs that name "
            f"{name} still load the shipped one; give them {written} in its place."
        )


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


def shipped_configs() -> dict[str, Traversable]:
    """The shipped configs (YAML files and the SLURM script) by their path inside the configs folder."""

    def walk(folder, prefix: str):
        for entry in folder.iterdir():
            if entry.name.startswith(("_", ".")):  # the package's __init__.py, __pycache__
                continue
            if entry.is_dir():
                yield from walk(entry, f"{prefix}{entry.name}/")
            else:
                yield f"{prefix}{entry.name}", entry

    return dict(sorted(walk(importlib.resources.files("ctrl.configs"), "")))


def copy_configs(folder: str | Path = "configs") -> list[Path]:
    """Copy the shipped configs into ``folder`` (``folder/digits/control.yaml``, ...) and return the files written.

    Nothing is copied when any of them exists already: a FileExistsError names it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"'{folder}' is a file: give `ctrl configs DIR` a folder to copy the configs into.")
    files = {folder / name: source for name, source in shipped_configs().items()}
    present = [str(path) for path in files if path.exists()]
    if present:
        more = f" (and {len(present) - 1} more of the shipped configs)" if len(present) > 1 else ""
        raise FileExistsError(
            f"'{present[0]}'{more} exists already and `ctrl configs` never overwrites: give a new folder "
            "(`ctrl configs DIR`) or move those files away."
        )
    for path, source in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
    return list(files)
