"""A contiguous span of a model's decoder layers: what one server loads and runs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig

from swarm.blocks import compat
from swarm.blocks.adapters import AdapterSet, load_adapters
from swarm.blocks.checkpoint import Checkpoint
from swarm.blocks.families import BlockFamily, family_for
from swarm.blocks.quantization import quantize_linear_layers
from swarm.blocks.served import BlockSession, Bounds, Prepared, ServedBlocks
from swarm.compression import CODECS
from swarm.hub.source import ModelSource, resolve_model
from swarm.rpc.messages import (
    read_active_adapter,
    read_attention_mask,
    read_block_range,
    read_hidden,
    read_position_ids,
    read_prompts,
    read_tensor,
)
from swarm.rpc.protocol import RequestError, get_field

logger = logging.getLogger(__name__)

# Steps of up to this many positions (rows x new tokens) run on one thread (Prepared.serial): they read every weight
# once for little arithmetic, so a thread pool gains nothing (15 SmolLM2 layers, 2 cores: 1, 4 positions take the
# same time on 1 or 2 threads; 8 positions 37 ms on 1, 30 ms on 2).
SERIAL_POSITIONS = 4


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


class BlockSpan(nn.Module, ServedBlocks):
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
        self.adapters = AdapterSet()  # LoRA adapters served beside the base weights (adapters.py)

    @classmethod
    def from_pretrained(cls, model: str | ModelSource | None, start: int, end: int, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        quantization: str = "none", adapters: list[str] | tuple[str, ...] = ()) -> BlockSpan:
        """Load layers [start, end) only: reads the checkpoint index and opens just the shards holding them.
        ``quantization``: "none", "int8" or "nf4" weights for the layers' linear modules. ``adapters``: peft LoRA
        adapters to serve beside them (``NAME=PATH`` or a path or hub name each; adapters.py)."""
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
        if adapters:
            span.adapters = load_adapters(list(adapters), layers, family.layers, family.base_prefix, start, end,
                                          dtype, device)
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
                cache: DynamicCache | None = None, first: int = 0, last: int | None = None,
                prompts: torch.Tensor | None = None, adapter: str | None = None) -> torch.Tensor:
        """Run local layers [first, last) (default: all) on ``hidden`` of shape (batch, new_tokens, hidden_size).

        ``position_ids``: (batch, new_tokens) absolute positions; ``attention_mask``: (batch, past + new) with 0 at
        padding, or None; ``cache``: this session's cache (None: no cache, e.g. training forward); ``prompts``: deep
        prompts (layers, 1 or batch, prompt length, hidden), added to the first new positions before each layer;
        ``adapter``: the LoRA adapter to apply (None: the base weights alone).
        """
        pieces = self.forward_pieces(hidden, position_ids, attention_mask, cache, first, last, prompts, adapter)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def forward_pieces(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, cache: DynamicCache | None = None, first: int = 0,
                       last: int | None = None,
                       prompts: torch.Tensor | None = None,
                       adapter: str | None = None) -> Generator[None, None, torch.Tensor]:
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
            if prompts is not None:  # out of place: a backward differentiates through it
                prompt = prompts[index - first].to(device, hidden.dtype)
                length = prompt.shape[1]
                hidden = torch.cat([hidden[:, :length] + prompt, hidden[:, length:]], dim=1)
            self.adapters.active = adapter  # at each layer: other requests' layers may have run since the last
            hidden = compat.call_layer(self.layers[index], hidden, mask=masks[self.layer_types[index]],
                                       position_ids=position_ids, position_embeddings=position_embeddings,
                                       cache=cache)
        return hidden

    # ---- the served-block protocol (served.py): sessions, steps, one-shot forward and backward

    kind = "span"
    session_steps = ("step",)
    one_shots = ("forward", "backward")
    flops_per_second: float | None = None  # from the speed measured at start (swarm/server/throughput.py)

    @property
    def max_position(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or 2**31 - 1

    def kv_bytes_per_position(self) -> int:
        """KV cache bytes one position of one row takes in one layer (keys and values)."""
        config = self.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * heads * head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def layer_params(self) -> int:
        """Parameters of one layer (they are all alike), counted once."""
        if "_layer_params" not in self.__dict__:
            self._layer_params = sum(p.numel() for p in self.layers[0].parameters()) if len(self.layers) else 0
        return self._layer_params

    def flops(self, rows: int, tokens: int, context: int, layers: int) -> float:
        """Estimated cost of ``tokens`` new positions per row attending over ``context`` positions, in ``layers``."""
        return layers * rows * tokens * (2.0 * self.layer_params() + 4.0 * context * self.hidden_size)

    def set_measured_speed(self, forward_tps: float) -> None:
        """From the start-up measurement: tokens/s of a 256-token forward over the whole span."""
        self.flops_per_second = self.flops(1, 256, 256, len(self.layers)) / 256 * forward_tps

    def open_session(self, message: dict, bounds: Bounds) -> SpanSession:
        start, end = read_block_range(message, self.start, self.end)
        max_length = get_field(message, "max_length", int)
        batch_size = get_field(message, "batch_size", int, default=1)
        if not 0 < max_length <= bounds.max_session_length:
            raise RequestError(f"max_length must be in [1, {bounds.max_session_length}], got {max_length}")
        if not 0 < batch_size <= bounds.max_batch_tokens:
            raise RequestError(f"batch_size must be in [1, {bounds.max_batch_tokens}], got {batch_size}")
        adapter = self.read_adapter(message)
        reserved = batch_size * max_length * (end - start) * self.kv_bytes_per_position()
        return SpanSession(start, end, reserved, read_codec(message, "output_codec"), blocks=self,
                           batch_size=batch_size, max_length=max_length, cache=self.new_cache(), adapter=adapter)

    def read_adapter(self, message: dict) -> str | None:
        """The LoRA adapter a request asks for (``active_adapter``; None: the base model), if served here."""
        try:
            return self.adapters.check(read_active_adapter(message))
        except LookupError as e:
            raise RequestError(str(e)) from None

    def read_inputs(self, message: dict, bounds: Bounds, past: int = 0):
        """Local layer range, hidden states, positions and mask of a forward/backward/step request."""
        start, end = read_block_range(message, self.start, self.end)
        hidden = read_hidden(message, self.hidden_size, bounds.max_batch_tokens)
        batch, tokens, _ = hidden.shape
        positions = read_position_ids(message, batch, tokens, self.max_position)
        mask = read_attention_mask(message, batch, past + tokens)
        return start - self.start, end - self.start, hidden, positions, mask

    def prepare(self, kind: str, message: dict, session: BlockSession | None, bounds: Bounds) -> Prepared:
        if kind == "step" and isinstance(session, SpanSession):
            return self._prepare_step(message, session, bounds)
        if kind == "forward":
            return self._prepare_forward(message, bounds)
        if kind == "backward":
            return self._prepare_backward(message, bounds)
        raise RequestError(f"a span serves steps in sessions, forward and backward; not {kind!r}")

    def _prepare_forward(self, message: dict, bounds: Bounds) -> Prepared:
        first, last, hidden, positions, mask = self.read_inputs(message, bounds)
        batch, tokens, _ = hidden.shape
        prompts = read_prompts(message, last - first, batch, tokens, self.hidden_size)
        adapter = self.read_adapter(message)
        flops = self.flops(batch, tokens, tokens, last - first)
        self.check_cost(flops, bounds)

        def run():
            return (yield from self.forward_pieces(hidden.to(self.dtype), positions, mask, None, first, last,
                                                   prompts, adapter))

        return Prepared(run, flops, batch * tokens, lambda output: ({}, {"hidden": output}), hidden.dtype,
                        serial=batch * tokens <= SERIAL_POSITIONS)

    def _prepare_backward(self, message: dict, bounds: Bounds) -> Prepared:
        """Gradient of the span's output w.r.t. its input, recomputing the forward (nothing is kept between calls)."""
        first, last, hidden, positions, mask = self.read_inputs(message, bounds)
        grad_output = read_hidden(message, self.hidden_size, bounds.max_batch_tokens, name="grad_output")
        if grad_output.shape != hidden.shape:
            raise RequestError(f"grad_output has shape {list(grad_output.shape)}, hidden {list(hidden.shape)}")
        batch, tokens, _ = hidden.shape
        prompts = read_prompts(message, last - first, batch, tokens, self.hidden_size)
        adapter = self.read_adapter(message)
        flops = 3 * self.flops(batch, tokens, tokens, last - first)
        self.check_cost(flops, bounds)

        def run():  # one piece: grad mode is per thread and must not be on while others' pieces run
            yield from ()
            with torch.enable_grad():
                inputs = hidden.to(self.dtype).requires_grad_(True)
                deep = None if prompts is None else prompts.to(self.dtype).requires_grad_(True)
                outputs = self(inputs, positions, mask, None, first, last, deep, adapter)
                wrt = [inputs] if deep is None else [inputs, deep]
                grads = torch.autograd.grad(outputs, wrt, grad_output.to(outputs.device, outputs.dtype))
            return grads

        def finish(grads: tuple[torch.Tensor, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
            tensors = {"grad_input": grads[0]}
            if len(grads) > 1:
                tensors["grad_prompts"] = grads[1]
            return {}, tensors

        return Prepared(run, flops, batch * tokens, finish, hidden.dtype)

    def _prepare_step(self, message: dict, session: SpanSession, bounds: Bounds) -> Prepared:
        position = get_field(message, "position", int, default=session.length)
        if not 0 <= position <= session.length:
            raise RequestError(f"step starts at position {position}, but {session.length} positions are cached")
        start, end = read_block_range(message, session.start, session.end)
        if (start, end) != (session.start, session.end):
            raise RequestError(f"this session runs blocks {session.start}:{session.end}, not {start}:{end}")
        first, last, hidden, positions, mask = self.read_inputs(message, bounds, past=position)
        batch, tokens, _ = hidden.shape
        if batch != session.batch_size:
            raise RequestError(f"batch of {batch} rows, but the session was opened for {session.batch_size}")
        if position + tokens > session.max_length:
            raise RequestError(f"length {position + tokens} exceeds the session's max_length {session.max_length}")
        hypo_ids = read_tensor(message, "hypo_ids", max_numel=batch, required=False)
        if hypo_ids is not None and (hypo_ids.dtype != torch.int64 or list(hypo_ids.shape) != [batch]
                                     or hypo_ids.min() < 0 or hypo_ids.max() >= batch):
            raise RequestError(f"hypo_ids must be int64 of shape [{batch}] with values in [0, {batch})")
        # deep prompts of a prompt-tuned model, with the step that holds the prompt's positions
        prompts = read_prompts(message, last - first, batch, tokens, self.hidden_size)
        flops = self.flops(batch, tokens, position + tokens, last - first)
        self.check_cost(flops, bounds)
        cache, inputs = session.cache, hidden.to(self.dtype)

        def run():  # in pieces (a layer each); undone if it fails or is dropped
            compat.truncate_cache(cache, position)  # a client rewinding (or replaying) to `position`
            if hypo_ids is not None:
                compat.reorder_cache(cache, hypo_ids)
            try:
                return (yield from self.forward_pieces(inputs, positions, mask, cache, first, last, prompts,
                                                       session.adapter))
            except BaseException:
                compat.truncate_cache(cache, position)  # undo what the layers that ran have written
                raise

        def finish(output: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
            session.length = position + tokens
            session.steps += 1
            return {"position": session.length}, {"hidden": output}

        # "batch": false keeps this step out of cross-session batches (batching.py), e.g. to time it alone
        batchable = get_field(message, "batch", bool, default=True) and tokens == 1 and hypo_ids is None \
            and prompts is None
        prepared = Prepared(run, flops, batch * tokens, finish, hidden.dtype, serial=batch * tokens <= SERIAL_POSITIONS)
        if batchable:
            prepared.batch_key = (id(self), first, last, inputs.dtype, inputs.device, session.adapter)
            prepared.payload = DecodeStep(run, self, cache, first, last, position, inputs, positions, mask,
                                          session.adapter)
        return prepared


@dataclass(eq=False)
class SpanSession(BlockSession):
    """An inference session on a span: its KV cache and where the client's history stands."""

    batch_size: int = 1
    max_length: int = 0
    cache: DynamicCache | None = None
    length: int = 0  # positions currently cached
    steps: int = 0
    adapter: str | None = None  # the LoRA adapter its steps run with (None: the base model)


@dataclass
class DecodeStep:
    """One session's decode step, checked, waiting for the compute thread (merged with others by
    swarm/server/batching.py)."""

    run_alone: Callable[[], Generator]  # the step as an unbatched job (truncates, runs, undoes on failure)
    span: nn.Module
    cache: object  # the session's DynamicCache
    first: int
    last: int
    position: int  # where the new token goes: the cache is rewound to this length first
    hidden: torch.Tensor  # (rows, 1, hidden_size) in the span's dtype
    positions: torch.Tensor  # (rows, 1)
    mask: torch.Tensor | None  # (rows, position + 1), or None: no padding
    adapter: str | None = None  # the LoRA adapter of its session

    @property
    def key(self) -> tuple:
        """Steps with equal keys can share one call."""
        return id(self.span), self.first, self.last, self.hidden.dtype, self.hidden.device, self.adapter


def read_codec(message: dict, name: str, default: str = "none") -> str:
    codec = get_field(message, name, str, default=default)
    if codec not in CODECS:
        raise RequestError(f"unknown {name.replace('_', ' ')} {codec!r}; known: {sorted(CODECS)}")
    return codec
