"""A contiguous span of a model's decoder layers: what one server loads and runs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Generator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig

from swarm.blocks import compat
from swarm.blocks.checkpoint import Checkpoint
from swarm.blocks.families import BlockFamily, family_for
from swarm.blocks.quantization import quantize_linear_layers
from swarm.hub.source import ModelSource, resolve_model

logger = logging.getLogger(__name__)


def load_config(source: ModelSource) -> PretrainedConfig:
    return AutoConfig.from_pretrained(source.config_path)


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a model made of layers [start, end) only, renumbered from 0 (so their caches are local)."""
    sub = copy.deepcopy(config)
    if getattr(config, "layer_types", None) is not None:
        sub.layer_types = list(config.layer_types[start:end])
    sub.num_hidden_layers = end - start
    return sub


def build_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model's ``*ForCausalLM`` on the meta device: module structure without memory or initialization."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class BlockSpan(nn.Module):
    """Decoder layers [start, end) of one model, run with or without a per-session KV cache.

    Layers are renumbered 0..n-1 so each session's cache holds exactly this span. Rotary position embeddings are
    computed here from the positions the client sends; the client keeps embeddings, final norm and LM head.
    """

    def __init__(self, config: PretrainedConfig, family: BlockFamily, layers: nn.ModuleList,
                 rotary: nn.Module | None, start: int, end: int, dtype: torch.dtype = torch.float32,
                 quantization: str = "none"):
        super().__init__()
        self.family, self.start, self.end = family, start, end
        self.dtype, self.quantization = dtype, quantization  # hidden states' dtype; weights' quantization
        self.config = config  # the span's own config (layers renumbered), as the layers themselves see it
        self.layers, self.rotary = layers, rotary
        self.layer_types = compat.layer_types(self.config)
        compat.check_supported_layer_types(self.layer_types)

    @classmethod
    def from_pretrained(cls, model: str | ModelSource | None, start: int, end: int, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        quantization: str = "none") -> BlockSpan:
        """Load layers [start, end) only: reads the checkpoint index and opens just the shards holding them.
        ``quantization``: "none", "int8" or "nf4" weights for the layers' linear modules."""
        source = model if isinstance(model, ModelSource) else resolve_model(model)
        config = load_config(source)
        num_layers = config.num_hidden_layers
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"blocks {start}:{end} are outside the model's 0:{num_layers}")
        family = family_for(config)
        sub = span_config(config, start, end)
        skeleton = build_skeleton(sub)
        layers: nn.ModuleList = skeleton.get_submodule(family.layers).to(dtype).to_empty(device=device)
        checkpoint = Checkpoint(source)
        for local, index in enumerate(range(start, end)):
            state = checkpoint.load_module(f"{family.layers}.{index}", dtype=dtype)
            layers[local].load_state_dict(state, strict=True)
        quantize_linear_layers(layers, quantization, dtype, device)
        rotary = None
        if family.rotary is not None:
            with torch.device(device):  # its buffers are computed at construction, so not on meta
                rotary = type(skeleton.get_submodule(family.rotary))(config=sub)
        # skeleton.config, not `sub`: from_config resolves the attention implementation into it, and the masks
        # must be built for the same implementation the layers run
        span = cls(skeleton.config, family, layers, rotary, start, end, dtype, quantization).eval()
        span.requires_grad_(False)  # servers compute input gradients only; never accumulate weight grads
        logger.info(f"Loaded blocks {start}:{end} of {source.name} from {sorted(checkpoint.opened_files)}")
        span.opened_files = sorted(checkpoint.opened_files)
        return span

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    def new_cache(self) -> DynamicCache:
        return compat.new_cache(self.config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: DynamicCache | None = None, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Run local layers [first, last) (default: all) on ``hidden`` of shape (batch, new_tokens, hidden_size).

        ``position_ids``: (batch, new_tokens) absolute positions; ``attention_mask``: (batch, past + new) with 0 at
        padding, or None; ``cache``: this session's cache (None: no cache, e.g. training forward).
        """
        pieces = self.forward_pieces(hidden, position_ids, attention_mask, cache, first, last)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def forward_pieces(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, cache: DynamicCache | None = None, first: int = 0,
                       last: int | None = None) -> Generator[None, None, torch.Tensor]:
        """``forward`` as a generator that yields between layers, where a server's compute thread may run other
        requests' work (swarm/server/compute.py); its return value is the output."""
        last = len(self.layers) if last is None else last
        device = self.device  # requests arrive on the CPU; a CUDA server computes on its GPU
        hidden, position_ids = hidden.to(device), position_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        masks = compat.attention_masks(self.config, self.layer_types[first:last], first, hidden,
                                       attention_mask, cache, position_ids)
        position_embeddings = self.rotary(hidden, position_ids) if self.rotary is not None else None
        for index in range(first, last):
            if index > first:
                yield
            hidden = compat.call_layer(self.layers[index], hidden, mask=masks[self.layer_types[index]],
                                       position_ids=position_ids, position_embeddings=position_embeddings,
                                       cache=cache)
        return hidden
