"""Loading the frozen components of a diffusers pipeline (a directory or a cached hub id) for the text-to-image
policies, and telling which kind of pipeline it is by its scheduler."""

from __future__ import annotations


def load_component(cls, path: str, component: str, pipeline: str, **kwargs):
    """``cls.from_pretrained(path, subfolder=component)``; a failure is a one-line ValueError naming the component and
    the kind of directory to give (``pipeline``: the diffusers pipeline class that writes it)."""
    try:
        return cls.from_pretrained(path, subfolder=component, **kwargs)
    except Exception as err:  # diffusers / transformers raise OSError, ValueError, EnvironmentError, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"could not load the {component} of '{path}' "
            f"({type(err).__name__}: {first}). Give a {pipeline} directory "
            f"(save_pretrained) or a hub id in the local cache."
        ) from None


def component_class(path: str, component: str) -> str | None:
    """The class name a pipeline's ``component`` config records (``_class_name`` of ``<component>/*config.json``,
    e.g. ``DDIMScheduler``, ``SD3Transformer2DModel``), from the local cache for a hub id (nothing is fetched); None
    when there is no such config to read."""
    from diffusers import ConfigMixin

    class Probe(ConfigMixin):  # any component's config: schedulers write scheduler_config.json, models config.json
        config_name = "scheduler_config.json" if component == "scheduler" else "config.json"

    try:
        return Probe.load_config(path, subfolder=component, local_files_only=True).get("_class_name")
    except Exception:  # no such folder or file, an unreadable config, a hub id that is not cached
        return None


def is_flow_matching(scheduler_class: str | None) -> bool:
    """Whether a scheduler class name is one of diffusers' flow-matching schedulers (velocity prediction: Stable
    Diffusion 3, Flux), as :func:`ctrl.sampling.is_flow_scheduler` tells a scheduler instance."""
    return bool(scheduler_class) and scheduler_class.startswith("FlowMatch")
