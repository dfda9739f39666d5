"""LoRA adapters served beside a span's base weights (``python -m swarm.server ... --adapters NAME_OR_PATH``).

An adapter is what peft's ``save_pretrained`` writes for a LoRA of the whole model: ``adapter_config.json`` and
``adapter_model.safetensors``. A server keeps only the low-rank matrices of its own layers and adds, to each adapted
linear module's output, ``lora_B(lora_A(x)) * scaling``: the same arithmetic as peft's LoRA layer (no dropout at
inference), so a client asking for the adapter gets the local peft model's output. The base weights stay untouched:
each request chooses its adapter (or none), and requests of different adapters share one copy of the model.

The adapter in use is the span's ``AdapterSet.active``, set before each layer call by whoever runs the layers; one
forward hook per adapted module reads it. A server computes on one thread and sets it before every layer, so
requests whose pieces interleave never see each other's choice.

Only adapters of decoder layers are served: one that also changes the embeddings or the LM head (parts clients run)
is refused, as are LoRA variants whose arithmetic differs (DoRA, biases, embedding or convolution adapters).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import nn

from swarm.hub.source import ModelSource, resolve_model
from swarm.utils.errors import UserError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_ADAPTERS = 64  # announced in every DHT record: a bound on its size (readers keep as many)
MAX_NAME_LENGTH = 256


class AdapterError(UserError, ValueError):
    """An adapter that cannot be served with these blocks."""


@dataclass
class LoraWeights:
    """One adapted module's low-rank pair: ``output += lora_B(lora_A(x)) * scaling``."""

    lora_a: torch.Tensor  # (rank, in_features)
    lora_b: torch.Tensor  # (out_features, rank)
    scaling: float


@dataclass
class AdapterSet:
    """The adapters loaded for one span, and the one in use for the layer call running now."""

    names: list[str] = field(default_factory=list)
    active: str | None = None  # read by the hooks; set by the span before each layer call
    hooks: list = field(default_factory=list)

    def check(self, name: str | None) -> str | None:
        """``name`` if these blocks serve it (None: the base model); a clear error otherwise."""
        if name is not None and name not in self.names:
            served = ", ".join(repr(n) for n in self.names) or "none"
            raise LookupError(f"this server does not serve adapter {name!r} (its adapters: {served})")
        return name


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH_OR_HUB_NAME``: the name clients ask for, and where the adapter is. A local
    directory is named after itself (its last path component), a hub adapter by its hub name."""
    if "=" in spec:
        name, _, where = spec.partition("=")
        if not name or not where:
            raise AdapterError(f"expected NAME=PATH or a path or hub name, got {spec!r}")
        return name, where
    path = Path(spec).expanduser()
    return (path.resolve().name if path.is_dir() else spec), spec


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``parse_adapter_spec`` of each of a server's ``--adapters``: at most ``MAX_ADAPTERS``, names unique and at
    most ``MAX_NAME_LENGTH`` characters."""
    if len(specs) > MAX_ADAPTERS:
        raise AdapterError(f"at most {MAX_ADAPTERS} adapters per server, got {len(specs)}")
    parsed: list[tuple[str, str]] = []
    for spec in specs:
        name, where = parse_adapter_spec(spec)
        if any(name == other for other, _ in parsed):
            raise AdapterError(f"two adapters are named {name!r}: name them with NAME=PATH")
        if len(name) > MAX_NAME_LENGTH:
            raise AdapterError(f"adapter names are at most {MAX_NAME_LENGTH} characters: {name[:40]!r}...")
        parsed.append((name, where))
    return parsed


def read_adapter(where: str | ModelSource) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's config and its weights (every tensor of the file, on the CPU)."""
    source = where if isinstance(where, ModelSource) else resolve_model(where)
    config_path = source.fetch("adapter_config.json", required=False)
    if config_path is None:
        raise AdapterError(f"{source.name} holds no adapter_config.json: is it a peft adapter?")
    config = json.loads(Path(config_path).read_text())
    for name in WEIGHT_FILES:
        path = source.fetch(name, required=False)
        if path is None:
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return config, load_file(str(path))
        return config, torch.load(path, map_location="cpu", weights_only=True)
    raise AdapterError(f"{source.name} holds neither of {', '.join(WEIGHT_FILES)}")


def check_config(name: str, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r} is a {config.get('peft_type')} adapter; servers serve LoRA only")
    for option, plain in (("use_dora", False), ("bias", "none")):
        if config.get(option, plain) not in (plain, None):
            raise AdapterError(f"adapter {name!r} uses {option}={config[option]!r}, which servers do not support")


def _scaling(config: dict, module: str, rank: int) -> float:
    """peft's scaling of one module: its alpha (``alpha_pattern`` overrides ``lora_alpha`` for matching module
    names) over its rank (over the rank's square root with ``use_rslora``)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """Linear-like modules: ``nn.Linear`` and bitsandbytes' (in_features, out_features), GPT-2's Conv1D (nx, nf)."""
    return (getattr(module, "in_features", None) or getattr(module, "nx", None),
            getattr(module, "out_features", None) or getattr(module, "nf", None))


def layer_weights(name: str, config: dict, tensors: dict[str, torch.Tensor], layers_path: str, base_prefix: str,
                  start: int, end: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """The LoRA pairs of layers [start, end): (layer index, module path in the layer) -> (A, B, scaling).

    peft names a tensor ``base_model.model.<module path>.lora_A.weight``, the path as in the model it wrapped: the
    ``*ForCausalLM`` (``model.layers.3.self_attn.q_proj``) or the base model (``layers.3.self_attn.q_proj``).
    """
    layers_short = layers_path[len(base_prefix) + 1:] if layers_path.startswith(base_prefix + ".") else layers_path
    pattern = re.compile(rf"(?:base_model\.model\.)?(?:{re.escape(layers_path)}|{re.escape(layers_short)})"
                         rf"\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise AdapterError(f"adapter {name!r} holds {key}, outside the decoder layers' LoRA matrices (clients "
                               f"compute embeddings and heads): servers serve adapters of decoder layers only")
        index, module, which = int(match[1]), match[2], match[3]
        if start <= index < end:
            pairs.setdefault((index, module), {})[which] = tensor
    out = {}
    for (index, module), pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["B"].dim() != 2 \
                or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterError(f"adapter {name!r}: layer {index}'s {module} lacks a matching lora_A/lora_B pair")
        rank = pair["A"].shape[0]
        out[(index, module)] = (pair["A"], pair["B"], _scaling(config, module, rank))
    return out


def attach_adapters(layers: nn.ModuleList, start: int, adapters: dict[str, dict], adapter_set: AdapterSet,
                    dtype: torch.dtype, device: torch.device | str) -> None:
    """Add ``adapters`` (name -> ``layer_weights`` of layers from ``start`` on) to ``layers``: one forward hook per
    adapted module, applying the pair of ``adapter_set.active`` (nothing when it is None or not adapted there)."""
    per_module: dict[tuple[int, str], dict[str, LoraWeights]] = {}
    for name, weights in adapters.items():
        for (index, module_path), (lora_a, lora_b, scaling) in weights.items():
            try:
                module = layers[index - start].get_submodule(module_path)
            except AttributeError:
                raise AdapterError(f"adapter {name!r} adapts {module_path} of layer {index}, which these blocks "
                                   f"do not have: is it an adapter of this model?") from None
            in_features, out_features = _in_out_features(module)
            if (in_features, out_features) != (lora_a.shape[1], lora_b.shape[0]):
                raise AdapterError(f"adapter {name!r}: layer {index}'s {module_path} maps {in_features} to "
                                   f"{out_features} features here, the adapter {lora_a.shape[1]} to "
                                   f"{lora_b.shape[0]}: is it an adapter of this model?")
            per_module.setdefault((index, module_path), {})[name] = LoraWeights(
                lora_a.to(device, dtype).contiguous(), lora_b.to(device, dtype).contiguous(), scaling)
        adapter_set.names.append(name)
    for (index, module_path), weights in per_module.items():
        module = layers[index - start].get_submodule(module_path)
        adapter_set.hooks.append(module.register_forward_hook(_lora_hook(adapter_set, weights)))


def _lora_hook(adapter_set: AdapterSet, weights: dict[str, LoraWeights]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        pair = weights.get(adapter_set.active)
        if pair is None:
            return None  # the base module's output as it is
        x = args[0].to(pair.lora_a.dtype)
        return (output + F.linear(F.linear(x, pair.lora_a), pair.lora_b) * pair.scaling).to(output.dtype)

    return hook


def load_adapters(specs: list[str], layers: nn.ModuleList, layers_path: str, base_prefix: str, start: int,
                  end: int, dtype: torch.dtype, device: torch.device | str) -> AdapterSet:
    """The adapters of ``specs`` (``NAME=PATH`` or a path or hub name each) attached to layers [start, end)."""
    adapter_set, loaded = AdapterSet(), {}
    for name, where in parse_adapter_specs(specs):
        config, tensors = read_adapter(where)
        check_config(name, config)
        loaded[name] = layer_weights(name, config, tensors, layers_path, base_prefix, start, end)
        logger.info(f"Adapter {name!r}: {len(loaded[name])} LoRA pairs in blocks {start}:{end}")
    attach_adapters(layers, start, loaded, adapter_set, dtype, device)
    return adapter_set
