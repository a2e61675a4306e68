"""Switching a peft-adapted network's LoRA layers on (the policy) and off (the pretrained model); reading a
diffusers LoRA folder into them (``init_lora``)."""

from __future__ import annotations

from pathlib import Path

from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

#: the file ``save_lora_weights`` writes and ``load_lora_weights`` reads in a LoRA folder
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class AdapterSwitch:
    """Turns the LoRA layers of ``model`` on or off, touching only those layers and only when the state changes.

    diffusers' ``enable_adapters`` / ``disable_adapters`` walk every module of the network on each call, which
    costs more than a small network's forward pass when a rollout switches twice per step. peft also switches
    the adapters' ``requires_grad`` off while they are disabled; turning them on restores it.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def set(self, on: bool) -> None:
        if self.layers and self.layers[0].disable_adapters == on:
            for layer in self.layers:
                layer.enable_adapters(on)


def read_diffusers_lora(directory: str | Path) -> tuple[dict[str, Tensor], set[float], list[str]]:
    """The UNet LoRA of a folder as ``StableDiffusionPipeline.load_lora_weights`` reads it (``ctrl export`` /
    ``ExportLora``'s ``pytorch_lora_weights.safetensors``, another trainer's, or a kohya/A1111 file, which diffusers
    converts): ``(layers, alphas, others)``.

    ``layers``: peft's names without the adapter's, ``<module>.lora_A.weight`` ``[r, in(, k, k)]`` and
    ``<module>.lora_B.weight`` ``[out, r(, 1, 1)]``. ``alphas``: the LoRA alpha(s) diffusers would load them with
    (the file's adapter metadata, else kohya's alphas, else alpha = rank). ``others``: names of the layers for other
    parts of the pipeline (the text encoder). A missing folder is a FileNotFoundError, a folder without a LoRA a
    ValueError.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no LoRA directory at '{directory}'; give a folder holding {LORA_WEIGHTS} (what ctrl export or "
            "ctrl.callbacks.ExportLora write, or any LoRA StableDiffusionPipeline.load_lora_weights reads)."
        )
    try:
        state, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(folder),
            return_lora_metadata=True,
            local_files_only=True,
            use_safetensors=True,  # never unpickle
        )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"'{directory}' holds no LoRA that diffusers can read ({type(err).__name__}: {first}); give a folder "
            f"holding {LORA_WEIGHTS}."
        ) from None
    layers = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if layers and not any("lora_A" in k for k in layers):  # diffusers' own older naming (lora.down / lora.up)
        layers = convert_unet_state_dict_to_peft(layers)
    metadata = {k.removeprefix("unet."): v for k, v in (metadata or {}).items() if k.startswith("unet.")}
    kohya = {v for k, v in (network_alphas or {}).items() if k.startswith("unet.")}
    if metadata.get("lora_alpha") is not None:
        alphas = {float(metadata["lora_alpha"]), *map(float, (metadata.get("alpha_pattern") or {}).values())}
    elif kohya:
        alphas = set(map(float, kohya))
    else:
        alphas = {float(v.shape[0]) for k, v in layers.items() if "lora_A" in k}
    return layers, alphas, sorted(k for k in state if not k.startswith("unet."))


def lora_mismatch(own: dict[str, Tensor], layers: dict[str, Tensor]) -> str:
    """How LoRA ``layers`` differ from an adapter's ``own`` (peft names -> tensors); "" when they have the same names
    and shapes."""
    extra, missing = sorted(set(layers) - set(own)), sorted(set(own) - set(layers))
    shapes = sorted(k for k in set(own) & set(layers) if own[k].shape != layers[k].shape)
    found = []
    if extra:
        found.append(f"{len(extra)} of its layers are not in this adapter (e.g. '{extra[0]}')")
    if missing:
        found.append(f"{len(missing)} of the adapter's are not in it (e.g. '{missing[0]}')")
    if shapes:
        first = shapes[0]
        found.append(
            f"{len(shapes)} have another shape (e.g. '{first}': {list(layers[first].shape)}, here "
            f"{list(own[first].shape)})"
        )
    return "; ".join(found)
