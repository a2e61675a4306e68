"""Switching a peft-adapted network's LoRA layers on (the policy) and off (the pretrained model); adding the adapter,
reading a diffusers LoRA folder into it (``init_lora``) and writing it out (``export``): what the text-to-image
policies (the UNet of Stable Diffusion 1.x/2.x, the transformer of Stable Diffusion 3) share."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from ctrl.errors import SettingError, setting

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


#: how a new adapter's A matrix starts (B is zero either way, so training starts at the pretrained model): peft's
#: ``init_lora_weights`` of each name. "default": Kaiming-uniform (peft's and diffusers' default); "gaussian":
#: normal with std 1 / rank, as trl's DDPO and AlignProp trainers start theirs.
LORA_INITS = {"default": True, "gaussian": "gaussian"}


def check_lora_init(owner, init: str) -> None:
    """Refuse a ``lora_init`` that is not in :data:`LORA_INITS` (before anything is loaded)."""
    if init not in LORA_INITS:
        raise SettingError(owner, "lora_init", f"'{init}' is not one of {sorted(LORA_INITS)}.")


#: the LoRA loader of each network a policy adapts: ``lora_state_dict`` reads a folder as that pipeline does
LOADERS = {"unet": StableDiffusionLoraLoaderMixin, "transformer": SD3LoraLoaderMixin}


def read_diffusers_lora(
    directory: str | Path, component: str = "unet", pipeline: str = "StableDiffusionPipeline"
) -> tuple[dict[str, Tensor], set[float], list[str]]:
    """The ``component`` LoRA (``unet``, or SD3's ``transformer``) of a folder as ``<pipeline>.load_lora_weights``
    reads it (``ctrl export`` / ``ExportLora``'s ``pytorch_lora_weights.safetensors``, another trainer's, or a
    kohya/A1111 file, which diffusers converts): ``(layers, alphas, others)``.

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
            f"ctrl.callbacks.ExportLora write, or any LoRA {pipeline}.load_lora_weights reads)."
        )
    try:
        found = LOADERS[component].lora_state_dict(
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
    # (state, network_alphas, metadata) for Stable Diffusion 1.x/2.x, (state, metadata) for SD3 (no kohya alphas)
    state, metadata = found[0], found[-1]
    network_alphas = found[1] if len(found) == 3 else None
    prefix = f"{component}."
    layers = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if any(".lora.down." in k or ".lora.up." in k for k in layers):  # diffusers' older naming, for some modules
        layers = convert_unet_state_dict_to_peft(layers)
    metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    kohya = {v for k, v in (network_alphas or {}).items() if k.startswith(prefix)}
    if metadata.get("lora_alpha") is not None:
        alphas = {float(metadata["lora_alpha"]), *map(float, (metadata.get("alpha_pattern") or {}).values())}
    elif kohya:
        alphas = set(map(float, kohya))
    else:
        alphas = {float(v.shape[0]) for k, v in layers.items() if "lora_A" in k}
    return layers, alphas, sorted(k for k in state if not k.startswith(prefix))


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


class LoraNetwork:
    """The LoRA of one network of a policy (``owner``, whose settings the errors name): ``model`` the frozen network
    (``self.unet``, ``self.transformer``), ``name`` how messages call it ("UNet"), ``component`` its folder in the
    pipeline and prefix in a LoRA file ("unet"), ``pipeline`` the diffusers pipeline that loads the LoRA, ``examples``
    the target modules a refusal suggests."""

    def __init__(self, owner, model: nn.Module, name: str, component: str, pipeline: str, examples: str):
        # the owner's class: what SettingError names (and no reference cycle through the policy's module tree)
        self.owner = owner if isinstance(owner, type) else type(owner)
        self.model, self.name = model, name
        self.component, self.pipeline, self.examples = component, pipeline, examples
        self.config: LoraConfig | None = None
        self.switch: AdapterSwitch | None = None

    def add(self, rank: int, alpha: float, targets: list[str], init: str = "default") -> LoraConfig:
        """A peft adapter (LoraConfig ``rank``, ``alpha``, ``targets``, A started as :data:`LORA_INITS` ``init``) on
        the network, its weights in float32 (under bfloat16/float16 frozen weights); targets that match no module
        and unknown inits are refused."""
        check_lora_init(self.owner, init)
        names = [n for n, _ in self.model.named_modules()]
        missing = [m for m in targets if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            raise SettingError(
                self.owner,
                "lora_target_modules",
                f"{missing} match no module of the {self.name}; name its Linear/Conv2d modules, e.g. {self.examples}.",
            )
        self.config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=LORA_INITS[init])
        self.model.add_adapter(self.config)
        self.switch = AdapterSwitch(self.model)
        for name, p in self.model.named_parameters():  # trainable weights in float32 under bf16/fp16 bases
            if "lora_" in name:
                p.data = p.data.float()
        return self.config

    def read_init(self, directory: str, rank: int, alpha: float | None) -> tuple[dict[str, Tensor], float]:
        """The network's layers of the LoRA folder ``init_lora`` and its alpha, refused unless they have this policy's
        rank and alpha (the adapter is then added with them)."""
        owner = self.owner
        if rank == 0:
            raise SettingError(
                owner, "init_lora", f"'{directory}' is a LoRA but lora_rank is 0; set lora_rank to its rank."
            )
        with setting(owner, "init_lora", directory):
            layers, alphas, others = read_diffusers_lora(directory, self.component, self.pipeline)
        if others or not layers:
            what = (
                f"layers for other parts of the pipeline than the {self.name} (e.g. '{others[0]}')"
                if others
                else "no layers"
            )
            raise SettingError(
                owner,
                "init_lora",
                f"'{directory}' holds {what}; ctrl trains a LoRA on the {self.name} only: give one of those.",
            )
        ranks = sorted({v.shape[0] for k, v in layers.items() if "lora_A" in k})
        if ranks != [rank]:
            raise SettingError(
                owner,
                "init_lora",
                f"'{directory}' holds a LoRA of rank {', '.join(map(str, ranks))} but lora_rank is {rank}; set "
                f"lora_rank: {ranks[0]} to start from it.",
            )
        if len(alphas) > 1:
            raise SettingError(
                owner, "init_lora", f"'{directory}' has one lora_alpha per layer; ctrl's adapter has one for all."
            )
        if alpha is not None and float(alpha) not in alphas:
            raise SettingError(
                owner,
                "init_lora",
                f"'{directory}' was saved with lora_alpha {next(iter(alphas)):g} but lora_alpha is {alpha:g}; set "
                "lora_alpha to the LoRA's, or leave it unset to take it.",
            )
        return layers, next(iter(alphas))

    def load_init(self, directory: str, layers: dict[str, Tensor]) -> None:
        """Copy ``layers`` (peft names, as :meth:`read_init` gives them) into the adapter, refused unless they are
        exactly its layers."""
        mismatch = lora_mismatch(get_peft_model_state_dict(self.model), layers)
        if mismatch:
            raise SettingError(
                self.owner,
                "init_lora",
                f"'{directory}' does not fit this {self.name}'s LoRA ({mismatch}): it was trained on another base "
                f"model or with other lora_target_modules than {sorted(self.config.target_modules)}.",
            )
        set_peft_model_state_dict(self.model, layers, adapter_name="default")

    def export_layers(self) -> tuple[dict[str, Tensor], dict]:
        """The adapter as ``<pipeline>.save_lora_weights`` takes it: peft's names (as diffusers' own LoRA training
        scripts save them; diffusers' older ``lora.down`` names exist for some modules only, and a file mixing the
        two is misread), on the CPU, and peft's LoraConfig as the adapter metadata (so that load_lora_weights
        takes its alpha)."""
        self.switch.set(True)
        with torch.no_grad():
            state = get_peft_model_state_dict(self.model)
        layers = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        metadata = self.config.to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        return layers, metadata

    def parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]
