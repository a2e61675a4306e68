"""The shipped configs, installed as package data of ``ctrl.configs`` (``package-dir`` in pyproject.toml):
``ctrl configs [DIR]`` copies them out of an installed package into ``DIR`` (default ``./configs``)."""
