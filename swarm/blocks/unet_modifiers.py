"""Per-session U-Net modifiers: named attention processors, and features captured in one pass and injected in a
later one. The same code runs on a server's levels and on a local U-Net, so a pipeline that uses them gives the
same output through the swarm as locally.

Attention processors travel as specs (a name and numbers), never as code:

* ``default``: diffusers' scaled dot-product attention (``AttnProcessor2_0``, ``AttnProcessor``);
* ``first_frame``: ConsistI2V's first-frame attention: in spatial self-attention every frame also attends to the
  first frame of its video (its keys and values are appended), which carries the first frame's appearance to the
  others. Frames are folded in the batch, ``num_frames`` per video.
* ``first_frame_temporal``: ConsistI2V's temporal counterpart: in temporal self-attention (over the frames at one
  position) every position also attends to the first frame's ``window`` x ``window`` neighbourhood around it.

Features live at *places*: a ResNet block's output (``up_blocks.1.resnets.0``) or a self-attention layer's
queries or keys (``up_blocks.1.attentions.0.transformer_blocks.0.attn1.q`` / ``.k``), as the projections make them
(before the split into heads). A pass may capture features under a tag the caller picks (e.g. the timestep) and
inject features captured earlier under another tag: a captured tensor of batch b replaces one of batch k x b
(repeated, so one inverted source serves both halves of classifier-free guidance). Captured bytes are counted
against a limit (the session's reservation on a server).

How it hooks in: ``install`` names every attention module, wraps its processor in a dispatcher and hooks every
ResNet block; all of it is inert until ``active`` sets this thread's processors and feature exchange (a server's
compute thread runs one session's level at a time and sets them around each level).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

MAX_FRAMES = 4096
MAX_TAG = 64  # characters of a feature tag
MAX_PLACES = 512  # places named by one request
_RESNET = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+$")
_state = threading.local()


class FeatureError(ValueError):
    """A capture or injection that cannot be done: over the byte limit, never captured, or of another shape."""


# ---- attention

def _frames_first(tensor: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch * frames, tokens, width) -> each row's video's first frame, same shape."""
    video = tensor.view(tensor.shape[0] // frames, frames, *tensor.shape[1:])
    return video[:, :1].expand_as(video).reshape(tensor.shape)


def _first_frame_window(tensor: torch.Tensor, window: int) -> torch.Tensor:
    """(batch * h * w, frames, width), rows in (batch, h, w) order as temporal attention sees them -> each row's
    first-frame ``window`` x ``window`` neighbourhood (edges repeated), (batch * h * w, window**2, width)."""
    size = getattr(_state, "temporal_size", None)
    if size is None:
        raise ValueError("first-frame temporal attention needs the U-Net's temporal layers hooked "
                         "(swarm.blocks.unet_modifiers.install)")
    height, width = size
    if tensor.shape[0] % (height * width):
        raise ValueError(f"temporal attention rows {tensor.shape[0]} are not whole {height}x{width} images")
    batch = tensor.shape[0] // (height * width)
    first = tensor[:, 0].reshape(batch, height, width, -1).permute(0, 3, 1, 2)
    pad = window // 2
    patches = F.unfold(F.pad(first, (pad, pad, pad, pad), mode="replicate"), window)  # (b, width * w^2, h * w)
    patches = patches.view(batch, -1, window * window, height * width)
    return patches.permute(0, 3, 2, 1).reshape(batch * height * width, window * window, -1)


def attend(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
           first_frame_of: int | None = None, first_frame_window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention as diffusers computes it, with this thread's feature exchange at the self-
    attention's queries and keys; with ``first_frame_of`` frames per video, the first frame's keys and values
    appended to every frame's (spatial layers); with ``first_frame_window``, the first frame's neighbourhood
    appended to every position's (temporal layers)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image = hidden_states.ndim == 4
    if image:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    self_attention = encoder_hidden_states is None
    batch, tokens = (hidden_states if self_attention else encoder_hidden_states).shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if self_attention:
        context = hidden_states
    else:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    key, value = attn.to_k(context), attn.to_v(context)
    name = getattr(attn, "swarm_name", None)
    exchange = getattr(_state, "exchange", None)
    if self_attention and exchange is not None and name is not None:
        query, key = exchange.at(f"{name}.q", query), exchange.at(f"{name}.k", key)
    if self_attention and first_frame_of:
        if attention_mask is not None or batch % first_frame_of:
            raise ValueError(f"first-frame attention needs a batch of whole videos of {first_frame_of} frames and "
                             f"no attention mask; got a batch of {batch}")
        key = torch.cat([key, _frames_first(key, first_frame_of)], dim=1)
        value = torch.cat([value, _frames_first(value, first_frame_of)], dim=1)
    if self_attention and first_frame_window:
        if attention_mask is not None:
            raise ValueError("first-frame temporal attention takes no attention mask")
        key = torch.cat([key, _first_frame_window(key, first_frame_window)], dim=1)
        value = torch.cat([value, _first_frame_window(value, first_frame_window)], dim=1)
    head_dim = key.shape[-1] // attn.heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                   is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if image:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class DefaultAttnProcessor:
    """diffusers' attention, through ``attend`` (so queries and keys can be captured and injected). Subclasses name
    their parameters (``params``: attributes, sent in the spec) and what they pass ``attend``."""

    name = "default"
    params: tuple[str, ...] = ()

    def spec(self) -> dict:
        return {"name": self.name, **{param: getattr(self, param) for param in self.params}}

    def options(self) -> dict:
        return {}

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **self.options())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(repr(self.spec()))


class FirstFrameAttnProcessor(DefaultAttnProcessor):
    """ConsistI2V's first-frame attention for spatial self-attention layers (cross-attention is left as is): give
    it to the layers named ``*.attentions.*.attn1`` (see ``first_frame_processors``), not to temporal ones."""

    name = "first_frame"
    params = ("num_frames",)

    def __init__(self, num_frames: int):
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or not 0 < num_frames <= MAX_FRAMES:
            raise ValueError(f"num_frames must be an integer in [1, {MAX_FRAMES}]")
        self.num_frames = num_frames

    def options(self) -> dict:
        return {"first_frame_of": self.num_frames}


MAX_WINDOW = 9


class FirstFrameTemporalAttnProcessor(DefaultAttnProcessor):
    """ConsistI2V's first-frame attention for temporal self-attention layers (``*.temp_attentions.*``): every
    position also attends to the first frame's ``window`` x ``window`` neighbourhood of it."""

    name = "first_frame_temporal"
    params = ("window",)

    def __init__(self, window: int = 3):
        if not isinstance(window, int) or isinstance(window, bool) or window % 2 == 0 or \
                not 0 < window <= MAX_WINDOW:
            raise ValueError(f"window must be an odd integer in [1, {MAX_WINDOW}]")
        self.window = window

    def options(self) -> dict:
        return {"first_frame_window": self.window}


PROCESSORS = {cls.name: cls for cls in (DefaultAttnProcessor, FirstFrameAttnProcessor,
                                         FirstFrameTemporalAttnProcessor)}


def processor_spec(processor: object) -> dict | None:
    """What travels for ``processor``: None for diffusers' own default (what servers run anyway), a spec for the
    processors named here; any other cannot run on servers."""
    if isinstance(processor, _Dispatch):  # a processor of a U-Net this module hooked (install)
        processor = processor.original
    if isinstance(processor, (AttnProcessor, AttnProcessor2_0)):
        return None
    if isinstance(processor, DefaultAttnProcessor):
        return processor.spec()
    raise NotImplementedError(f"{type(processor).__name__} cannot run on the swarm's servers (processors travel by "
                              f"name, not as code); available: AttnProcessor2_0 (default), "
                              f"{', '.join(cls.__name__ for cls in PROCESSORS.values())}")


def processor_from_spec(spec: object) -> DefaultAttnProcessor:
    """The processor a spec names (raises ValueError with a clear message on anything else)."""
    if not isinstance(spec, dict) or spec.get("name") not in PROCESSORS:
        raise ValueError(f"unknown attention processor {spec!r}; available: {sorted(PROCESSORS)}")
    cls = PROCESSORS[spec["name"]]
    if set(spec) != {"name", *cls.params}:
        raise ValueError(f"the {cls.name} processor takes " +
                         (f"{', '.join(cls.params)} only" if cls.params else "no parameters"))
    return cls(**{param: spec[param] for param in cls.params})


def attention_names(unet: nn.Module) -> list[str]:
    """The U-Net's attention layers by name, as diffusers' ``attn_processors`` keys them (minus ``.processor``)."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention)]


def first_frame_processors(unet: nn.Module, num_frames: int,
                           temporal_window: int | None = None) -> dict[str, DefaultAttnProcessor]:
    """First-frame attention on every spatial self-attention layer, and with ``temporal_window`` on every temporal
    one, the default elsewhere: a map for ``unet.set_attn_processor`` (local U-Net or ``RemoteUNet``)."""
    names = getattr(unet, "swarm_attention_names", None)
    if names is None:  # a local U-Net: its temporal layers tell the processors their images' size
        names = attention_names(unet)
        install(unet)

    def chosen(name: str) -> DefaultAttnProcessor:
        if _spatial_self_attention(name):
            return FirstFrameAttnProcessor(num_frames)
        if temporal_window and ".temp_attentions." in name:  # attn1 and attn2 (cross-attention is left as is)
            return FirstFrameTemporalAttnProcessor(temporal_window)
        return DefaultAttnProcessor()

    return {f"{name}.processor": chosen(name) for name in names}


def _spatial_self_attention(name: str) -> bool:
    return ".attentions." in name and name.endswith(".attn1")


# ---- feature places and the exchange

def feature_places(unet: nn.Module) -> list[str]:
    """Every place features may be captured at or injected into."""
    places = []
    for name, module in unet.named_modules():
        if _RESNET.match(name):
            places.append(name)
        elif isinstance(module, Attention) and name.endswith(".attn1"):
            places += [f"{name}.q", f"{name}.k"]
    return places


def place_level(place: str, levels: int) -> int:
    """The level holding ``place`` in a U-Net of ``levels`` levels (level i: down block i and up block
    levels-2-i; the last: the mid block)."""
    parts = place.split(".")
    if parts[0] == "mid_block":
        return levels - 1
    index = int(parts[1])
    return index if parts[0] == "down_blocks" else levels - 2 - index


Budget = int | dict[str, int]  # bytes a server may keep: the same for each, or per place (summed over its levels)


def budget_for(budget: Budget, start: int, end: int, levels: int) -> int:
    """What a server of levels [start, end) reserves for captured features under ``budget``."""
    if isinstance(budget, int):
        return budget
    return sum(size for place, size in budget.items() if start <= place_level(place, levels) < end)


def check_budget(budget: object, places: set[str]) -> Budget:
    """A positive number of bytes, or a map of known places to non-negative bytes with a positive total."""
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    if isinstance(budget, dict) and budget and all(
            p in places and isinstance(b, int) and not isinstance(b, bool) and b >= 0 for p, b in budget.items()) \
            and sum(budget.values()) > 0:
        return dict(budget)
    raise ValueError("max_bytes must be a positive number of bytes, or a map of feature places to bytes")


@dataclass
class FeatureStore:
    """Captured features by (tag, place), within ``limit`` bytes."""

    limit: int
    tensors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        # a copy: info reads this while the compute thread may be capturing
        return sum(t.numel() * t.element_size() for t in list(self.tensors.values()))

    def has(self, tag: str, place: str) -> bool:
        return (tag, place) in self.tensors

    def put(self, tag: str, place: str, tensor: torch.Tensor) -> None:
        old = self.tensors.get((tag, place))
        held = self.bytes - (old.numel() * old.element_size() if old is not None else 0)
        size = tensor.numel() * tensor.element_size()
        if held + size > self.limit:
            raise FeatureError(f"capturing {place} under {tag!r} would hold {held + size} bytes of features; this "
                               f"session may hold {self.limit} (ask for more when opening it, or capture fewer)")
        self.tensors[(tag, place)] = tensor.detach().clone()

    def get(self, tag: str, place: str, like: torch.Tensor) -> torch.Tensor:
        stored = self.tensors.get((tag, place))
        if stored is None:
            raise FeatureError(f"no features were captured at {place} under {tag!r} in this session")
        if stored.shape[1:] != like.shape[1:] or like.shape[0] % stored.shape[0]:
            raise FeatureError(f"features captured at {place} under {tag!r} have shape {list(stored.shape)}; this "
                               f"pass has {list(like.shape)} there")
        repeat = like.shape[0] // stored.shape[0]
        stored = stored.to(like.device, like.dtype)
        return stored if repeat == 1 else stored.repeat(repeat, *([1] * (stored.dim() - 1)))

    def drop(self, tag: str) -> None:
        for key in [key for key in self.tensors if key[0] == tag]:
            del self.tensors[key]

    def clear(self) -> None:
        self.tensors.clear()


@dataclass
class FeatureRequest:
    """What one pass captures (under ``capture_tag``) and injects (from ``inject_tag``), and where."""

    capture_tag: str | None = None
    capture_places: frozenset[str] = frozenset()
    inject_tag: str | None = None
    inject_places: frozenset[str] = frozenset()

    def to_message(self) -> dict:
        message = {}
        if self.capture_tag is not None:
            message["capture"] = {"tag": self.capture_tag, "places": sorted(self.capture_places)}
        if self.inject_tag is not None:
            message["inject"] = {"tag": self.inject_tag, "places": sorted(self.inject_places)}
        return message

    @classmethod
    def from_message(cls, message: object, known: Iterable[str]) -> FeatureRequest:
        """Checks tags and places (raises ValueError with a clear message)."""
        if not isinstance(message, dict) or not set(message) <= {"capture", "inject"}:
            raise ValueError("features must be a map with 'capture' and/or 'inject'")
        known = set(known)
        parts = {}
        for key in ("capture", "inject"):
            part = message.get(key)
            if part is None:
                continue
            tag, places = (part.get("tag"), part.get("places")) if isinstance(part, dict) else (None, None)
            if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG:
                raise ValueError(f"features.{key}.tag must be a string of 1 to {MAX_TAG} characters")
            if not isinstance(places, list) or not 0 < len(places) <= MAX_PLACES or not all(
                    isinstance(p, str) for p in places):
                raise ValueError(f"features.{key}.places must list 1 to {MAX_PLACES} place names")
            unknown = [p for p in places if p not in known]
            if unknown:
                examples = ", ".join(sorted(known)[:3])
                raise ValueError(f"unknown feature places {unknown[:3]}: places are ResNet outputs and self-attention "
                                 f"queries/keys, e.g. {examples}")
            parts[key] = (tag, frozenset(places))
        capture, inject = parts.get("capture", (None, frozenset())), parts.get("inject", (None, frozenset()))
        return cls(capture[0], capture[1], inject[0], inject[1])

    def mine(self, places: set[str]) -> FeatureRequest:
        """The part of this request at ``places`` (a server's own levels)."""
        capture, inject = self.capture_places & places, self.inject_places & places
        return FeatureRequest(self.capture_tag if capture else None, capture,
                              self.inject_tag if inject else None, inject)

    @property
    def empty(self) -> bool:
        return not self.capture_places and not self.inject_places


@dataclass
class Exchange:
    """One pass's captures and injections against a store. Captures are kept aside until the pass ends
    (``commit``), so a pass that fails leaves the store as it was."""

    request: FeatureRequest
    store: FeatureStore
    captured: dict[str, torch.Tensor] = field(default_factory=dict)

    def check(self) -> None:
        """Before any compute: every injected place must have been captured under the tag."""
        for place in sorted(self.request.inject_places):
            if not self.store.has(self.request.inject_tag, place):
                raise FeatureError(f"no features were captured at {place} under {self.request.inject_tag!r} in "
                                   f"this session")

    def at(self, place: str, tensor: torch.Tensor) -> torch.Tensor:
        if place in self.request.capture_places:
            size = tensor.numel() * tensor.element_size()
            pending = sum(t.numel() * t.element_size() for t in self.captured.values())
            held = sum(t.numel() * t.element_size() for (tag, p), t in self.store.tensors.items()
                       if not (tag == self.request.capture_tag and p in self.request.capture_places))
            if held + pending + size > self.store.limit:
                raise FeatureError(f"capturing {place} under {self.request.capture_tag!r} would hold "
                                   f"{held + pending + size} bytes of features; this session may hold "
                                   f"{self.store.limit} (ask for more when opening it, or capture fewer)")
            self.captured[place] = tensor.detach().clone()
        if place in self.request.inject_places:
            return self.store.get(self.request.inject_tag, place, tensor)
        return tensor

    def commit(self) -> None:
        for place, tensor in self.captured.items():
            self.store.put(self.request.capture_tag, place, tensor)
        self.captured.clear()


# ---- hooks

class _Dispatch:
    """Installed as every attention module's processor: the processor this thread's session names for the module,
    else ``attend`` when its queries or keys are exchanged, else the module's own processor."""

    def __init__(self, original: object):
        self.original = original

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        processors = getattr(_state, "processors", None) or {}
        chosen = processors.get(attn.swarm_name)
        if chosen is not None:
            return chosen(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        exchange = getattr(_state, "exchange", None)
        if exchange is not None and encoder_hidden_states is None and (
                f"{attn.swarm_name}.q" in exchange.request.capture_places | exchange.request.inject_places
                or f"{attn.swarm_name}.k" in exchange.request.capture_places | exchange.request.inject_places):
            return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def _temporal_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    _state.temporal_size = tuple(hidden.shape[-2:])  # (batch * frames, channels, height, width)


def _resnet_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    exchange = getattr(_state, "exchange", None)
    if exchange is None:
        return None
    return exchange.at(module.swarm_name, output)


def install(unet: nn.Module) -> None:
    """Name the U-Net's attention modules and ResNet blocks and hook them (inert outside ``active``). Idempotent."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            module.swarm_name = name
            if not isinstance(module.processor, _Dispatch):
                module.processor = _Dispatch(module.processor)
        elif _RESNET.match(name) and not hasattr(module, "swarm_name"):
            module.swarm_name = name
            module.register_forward_hook(_resnet_output)
        elif isinstance(module, TransformerTemporalModel) and not hasattr(module, "swarm_name"):
            module.swarm_name = name
            module.register_forward_pre_hook(_temporal_size, with_kwargs=True)


@contextlib.contextmanager
def active(processors: dict[str, DefaultAttnProcessor] | None = None,
           exchange: Exchange | None = None) -> Iterator[None]:
    """Use ``processors`` (by attention module name) and ``exchange`` in this thread's U-Net calls inside."""
    previous = getattr(_state, "processors", None), getattr(_state, "exchange", None)
    _state.processors, _state.exchange = processors, exchange
    try:
        yield
    finally:
        _state.processors, _state.exchange = previous


def read_processors(message: object, known: Iterable[str]) -> dict[str, DefaultAttnProcessor]:
    """A session's processors: {attention module name: spec} (raises ValueError with a clear message)."""
    if message is None:
        return {}
    known = set(known)
    if not isinstance(message, dict) or len(message) > len(known):
        raise ValueError("processors must map attention layer names to processor specs")
    result = {}
    for name, spec in message.items():
        if name not in known:
            raise ValueError(f"no attention layer is named {name!r} in this U-Net")
        result[name] = processor_from_spec(spec)
    return result


# ---- a local U-Net's feature bank (RemoteUNet has its own, keeping features on the servers)

class FeatureBank:
    """``with bank.capture(tag, places): unet(...)``, later ``with bank.inject(tag, places): unet(...)``; the same
    calls for a local U-Net (``LocalFeatureBank``) and a remote one (``RemoteUNet.feature_bank``)."""

    def _use(self, request: FeatureRequest) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def capture(self, tag: str, places: Iterable[str]) -> contextlib.AbstractContextManager:
        return self._use(FeatureRequest(capture_tag=tag, capture_places=frozenset(places)))

    def inject(self, tag: str, places: Iterable[str]) -> contextlib.AbstractContextManager:
        return self._use(FeatureRequest(inject_tag=tag, inject_places=frozenset(places)))

    def close(self) -> None:
        raise NotImplementedError


class LocalFeatureBank(FeatureBank):
    """Captures and injects features of a local diffusers U-Net, keeping them in this process."""

    def __init__(self, unet: nn.Module, max_bytes: Budget):
        install(unet)
        self.places = set(feature_places(unet))
        budget = check_budget(max_bytes, self.places)
        self.unet, self.store = unet, FeatureStore(budget if isinstance(budget, int) else sum(budget.values()))

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @contextlib.contextmanager
    def _use(self, request: FeatureRequest) -> Iterator[None]:
        request = FeatureRequest.from_message(request.to_message(), self.places)
        exchange = Exchange(request, self.store)
        exchange.check()
        with active(getattr(_state, "processors", None), exchange):
            yield
        exchange.commit()

    def close(self) -> None:
        self.store.clear()
