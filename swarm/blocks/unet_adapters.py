"""LoRA adapters served beside a U-Net's levels (``python -m swarm.server PIPELINE --adapters NAME=PATH``).

An adapter is what diffusers' ``save_lora_weights`` writes (``pytorch_lora_weights.safetensors``), or any file
diffusers' ``lora_state_dict`` reads (kohya's format among others). A server keeps the pairs of its own levels and
lets diffusers inject them (peft LoRA layers), so the arithmetic is diffusers' own and a session choosing an adapter
gets what a local U-Net with ``load_lora_weights`` computes.

A session chooses its adapters and their weights at open (diffusers' ``set_adapters``) and each evaluation may
scale them (``cross_attention_kwargs={"scale": s}``). The choice is set on the LoRA layers before every level call,
the way diffusers sets it before every forward, on the one compute thread: one session's choice never reaches
another's call. The base weights stay as they are: sessions without an adapter share them.

Only the blocks' adapters are served. A LoRA's text-encoder part runs on clients (a distributed pipeline's
``load_lora_weights`` loads it there, and checks that the servers serve the rest under that name). One that adapts
the U-Net's head or tail (which clients run) is refused, as is one whose LoRA config would differ from a whole-model
load once cut to these levels.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.blocks.adapters import MAX_NAME_LENGTH, AdapterError, parse_adapter_specs
from swarm.hub.source import resolve_model
from swarm.rpc.protocol import RequestError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
MAX_SESSION_ADAPTERS = 8  # adapters one session may combine
MAX_LORA_WEIGHT = 1e3  # |weight| and |scale|: beyond it a LoRA only makes NaNs


@dataclass(frozen=True)
class LoraChoice:
    """The adapters a call runs with: ``(name, weight)`` pairs as diffusers' ``set_adapters`` takes them, and the
    call's ``cross_attention_kwargs`` scale. The empty choice is the base model."""

    adapters: tuple[tuple[str, float], ...] = ()
    scale: float = 1.0


BASE = LoraChoice()


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            abs(value) > MAX_LORA_WEIGHT:
        raise RequestError(f"{what} must be a finite number within +-{MAX_LORA_WEIGHT:g}, got {value!r}")
    return float(value)


def read_adapters(message: dict, served: list[str]) -> tuple[tuple[str, float], ...]:
    """A session's ``adapters``: absent (the base model) or ``[[name, weight], ...]`` of adapters this server
    serves, each once."""
    pairs = message.get("adapters")
    if pairs is None:
        return ()
    if not isinstance(pairs, list) or len(pairs) > MAX_SESSION_ADAPTERS or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
        raise RequestError(f"adapters must be a list of at most {MAX_SESSION_ADAPTERS} [name, weight] pairs")
    names = [name for name, _ in pairs]
    for name in names:
        if name not in served:
            raise RequestError(f"this server does not serve adapter {name[:MAX_NAME_LENGTH]!r} (its adapters: "
                               f"{', '.join(repr(n) for n in served) or 'none'})")
    if len(set(names)) != len(names):
        raise RequestError("adapters must name each adapter once")
    return tuple((name, _number(weight, f"adapter {name!r}'s weight")) for name, weight in pairs)


def read_scale(message: dict) -> float:
    """An evaluation's ``lora_scale`` (``cross_attention_kwargs``' scale; 1 when absent)."""
    return _number(message.get("lora_scale", 1.0), "lora_scale")


def read_lora(where: str, unet_config: dict) -> tuple[dict, dict | None, dict | None]:
    """A LoRA's state dict (keys ``unet.<module>...`` and ``text_encoder...``), network alphas and metadata, as
    diffusers reads them for ``load_lora_weights``: ``where`` is a directory holding ``LORA_FILE``, a
    ``.safetensors`` file, or a hub name."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    path = Path(where).expanduser()
    if path.is_file():
        directory, weight_name = path.parent, path.name
    else:
        source = resolve_model(where)
        found = source.fetch(LORA_FILE, required=False)
        if found is None:
            raise AdapterError(f"{source.name} holds no {LORA_FILE} (what diffusers' save_lora_weights writes): "
                               "pass the LoRA's .safetensors file itself")
        directory, weight_name = found.parent, found.name
    try:
        return StableDiffusionLoraLoaderMixin.lora_state_dict(str(directory), weight_name=weight_name,
                                                              unet_config=unet_config, return_lora_metadata=True)
    except (ValueError, KeyError, OSError) as e:
        raise AdapterError(f"{where}: diffusers cannot read it as a LoRA ({e})") from None


HEAD_OR_TAIL = ("adapts {}, part of the U-Net's head or tail, which clients run: servers serve LoRAs of the "
                "U-Net's blocks (and clients load a LoRA's text-encoder part)")


def head_or_tail_module(state: dict, prefix: str = "unet") -> str | None:
    """The first module of the U-Net (keys ``prefix.<module>.lora...``) that ``state`` adapts outside its blocks,
    if any."""
    for key in state:
        module = key.removeprefix(f"{prefix}.")
        if module != key and not module.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
            return module.rsplit(".lora", 1)[0]
    return None


def _first_rank(state: dict) -> int | None:
    return next((value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1), None)


def load_unet_adapters(specs: list[str], unet: nn.Module, held: list[str]) -> list[str]:
    """Inject the adapters of ``specs`` (``NAME=PATH`` or a path or hub name each) into the modules of ``unet`` at
    the paths ``held`` (the levels a server holds), frozen. Returns their names."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    names, prefixes = [], tuple(f"{path}." for path in held)
    for name, where in parse_adapter_specs(specs):
        state, alphas, metadata = read_lora(where, dict(unet.config))
        outside = head_or_tail_module(state)
        if outside is not None:
            raise AdapterError(f"adapter {name!r} {HEAD_OR_TAIL.format(outside)}")
        if any(not key.startswith("unet.") for key in state):
            logger.info(f"Adapter {name!r} also adapts the text encoders: clients run them, and a pipeline's "
                        "load_lora_weights loads that part there")
        mine = {key: value for key, value in state.items() if key.removeprefix("unet.").startswith(prefixes)}
        if not mine:
            logger.warning(f"Adapter {name!r} adapts nothing in {', '.join(held)}: served as the base weights")
        elif not metadata and not alphas:
            # without a recorded config diffusers takes the first module's rank as every module's alpha: cut to
            # our levels, that first module may be another one
            whole = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
            ours = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in mine.items()})
            if _first_rank(whole) != _first_rank(ours):
                raise AdapterError(f"adapter {name!r} mixes LoRA ranks and records neither alphas nor its config: "
                                   "its scaling depends on the whole model. Save it with diffusers' "
                                   "save_lora_weights, which records the config")
        if mine:
            with warnings.catch_warnings():
                # peft notes the recorded config's targets outside our levels, and a second adapter: both expected
                warnings.filterwarnings("ignore", "While injecting the PEFT adapters", RuntimeWarning)
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                unet.load_lora_adapter(mine, prefix="unet", network_alphas=alphas, metadata=metadata,
                                       adapter_name=name)
        names.append(name)
        logger.info(f"Adapter {name!r}: {sum('lora_A' in key or 'lora.down' in key for key in mine)} LoRA pairs in "
                    f"{', '.join(held)}")
    unet.requires_grad_(False)  # peft makes what it injects trainable; the servers' weights stay frozen
    return names


def lora_layers(unet: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def select(layers: list, choice: LoraChoice) -> None:
    """Set ``choice`` on every LoRA layer, as diffusers' ``set_adapters`` then a forward's ``scale_lora_layers``
    would (the same float operations, so the same scaling)."""
    names = [name for name, _ in choice.adapters]
    for layer in layers:
        layer.set_adapter(names, inference_mode=True)
        for name, weight in choice.adapters:
            layer.set_scale(name, weight)
        layer.scale_layer(choice.scale)
