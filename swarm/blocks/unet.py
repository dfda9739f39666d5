"""Diffusion U-Nets cut into stages: head, down blocks, mid, up blocks, tail; one generic splitter for diffusers'
UNet2DConditionModel (SD 1.x/2.x, SDXL), UNet3DConditionModel, UNetSpatioTemporalConditionModel, I2VGenXLUNet and
UNetMotionModel. All fold video frames into the batch and run the same down/mid/up loop.

The head is each model's own forward up to its first down block (captured with a pre-hook that stops it there),
so every class's conditioning (text-time embeddings, fps, image latents, frame folding...) is reused as is. The
tail is norm, activation, conv_out and the model's frame unfolding.

Served U-shaped: *level* i < n holds down block i and up block n-1-i, level n holds the mid block. Up block n-1-i
consumes exactly the skips level i produced (the input of down block i, then its resnets' outputs), so skip tensors
never leave the server of their level; only ``sample`` travels. Head and tail stay with the client, like an LLM's
embeddings and head.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field

import diffusers
import torch
from torch import nn

from swarm.blocks import latent_shift, unet_adapters, unet_modifiers
from swarm.blocks.checkpoint import Checkpoint
from swarm.blocks.served import BlockSession, Bounds, Prepared, ServedBlocks, SpanSpeed
from swarm.blocks.span import read_codec
from swarm.blocks.unet_backward import BACKWARD_STEPS, prepare_backward
from swarm.compression import PayloadError, deserialize_tensor, serialize_tensor
from swarm.hub.source import ModelSource
from swarm.rpc.messages import read_block_range, read_float_tensor, read_sizes, read_tensor
from swarm.rpc.protocol import RequestError, get_field

UNET_CLASSES = ("UNet2DConditionModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel", "I2VGenXLUNet",
                "UNetMotionModel")
CROSS_ATTENTION_KWARGS = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs",
                          "encoder_attention_mask")
BLOCK_PREFIXES = ("down_blocks.", "up_blocks.", "mid_block.")


class _StopAtFirstBlock(Exception):
    pass


@dataclass
class HeadOutput:
    """The state entering the first down block, and what the tail needs."""

    sample: torch.Tensor  # (batch * frames, channels, height, width)
    temb: torch.Tensor  # time (and added conditioning) embedding
    encoder_hidden_states: torch.Tensor | None  # as the blocks see them (processed, repeated per frame...)
    extra: dict = field(default_factory=dict)  # other block arguments: num_frames, image_only_indicator, ...
    batch_size: int = 1
    num_frames: int | None = None  # None for image models
    forward_upsample_size: bool = False  # latent size not a multiple of the total upsampling factor
    latent_shift_frames: int | None = None  # Latent-Shift along this many frames folded in the batch (latent_shift.py)
    freeu: dict | None = None  # FreeU factors (s1, s2, b1, b2) applied in the up blocks, as enable_freeu sets them
    lora_scale: float = 1.0  # cross_attention_kwargs' scale of the LoRA adapters in use (unet_adapters.py)


def unet_class(config: dict) -> type[nn.Module]:
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise NotImplementedError(f"U-Net class {name!r} is not supported; supported: {list(UNET_CLASSES)}")
    return getattr(diffusers, name)


def num_levels(unet: nn.Module) -> int:
    return len(unet.down_blocks) + 1


def level_paths(n: int, level: int) -> list[str]:
    """The modules of ``level`` in a U-Net with ``n`` down blocks: down block i and up block n-1-i, or the mid
    block (level n)."""
    return ["mid_block"] if level == n else [f"down_blocks.{level}", f"up_blocks.{n - 1 - level}"]


def check_pairing(unet: nn.Module) -> None:
    """The standard layout: every down block but the last downsamples, and each up block takes one skip more than
    its paired down block has resnets (that one being the down block's input)."""
    n = len(unet.down_blocks)
    for i, down in enumerate(unet.down_blocks):
        if bool(getattr(down, "downsamplers", None)) != (i < n - 1):
            raise NotImplementedError(f"down block {i} {'lacks' if i < n - 1 else 'has'} a downsampler: "
                                      "this U-Net's skips do not pair by level")
        up = unet.up_blocks[n - 1 - i]
        if len(up.resnets) != len(down.resnets) + 1:
            raise NotImplementedError(f"up block {n - 1 - i} takes {len(up.resnets)} skips but down block {i} "
                                      f"makes {len(down.resnets) + 1}: this U-Net's skips do not pair by level")


def run_head(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
             **kwargs) -> HeadOutput:
    """The model's own forward up to the first down block, whose inputs are captured."""
    captured: dict = {}

    def capture(module, args, block_kwargs):
        captured.update(block_kwargs)
        raise _StopAtFirstBlock

    # nn.Module's own method: a client's stand-in block refuses hooks from users (they would never fire there)
    hook = nn.Module.register_forward_pre_hook(unet.down_blocks[0], capture, with_kwargs=True)
    try:
        unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        raise RuntimeError("the U-Net returned without calling its first down block")
    except _StopAtFirstBlock:
        pass
    finally:
        hook.remove()
    hidden = captured.pop("hidden_states")
    temb = captured.pop("temb")
    ehs = captured.pop("encoder_hidden_states", encoder_hidden_states)
    for name in CROSS_ATTENTION_KWARGS[1:]:
        if captured.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported through the swarm yet")
        captured.pop(name, None)
    extra = {k: v for k, v in captured.items() if v is not None}
    video = sample.dim() == 5
    factor = up_factor(unet)
    return HeadOutput(
        sample=hidden, temb=temb, encoder_hidden_states=ehs, extra=extra, batch_size=sample.shape[0],
        num_frames=extra.get("num_frames", sample.shape[1] if video else None) if video else None,
        forward_upsample_size=any(s % factor != 0 for s in sample.shape[-2:]))


def run_tail(unet: nn.Module, sample: torch.Tensor, head: HeadOutput) -> torch.Tensor:
    if getattr(unet, "conv_norm_out", None) is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    sample = unet.conv_out(sample)
    if head.num_frames is None:
        return sample
    if type(unet).__name__ == "UNetSpatioTemporalConditionModel":  # (batch, frames, channels, h, w)
        return sample.reshape(head.batch_size, head.num_frames, *sample.shape[1:])
    # (batch, channels, frames, h, w)
    return sample[None, :].reshape((-1, head.num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)


def _block_kwargs(block: nn.Module, hidden: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None,
                  extra: dict, **more) -> dict:
    """The arguments the monolithic forward would pass this block."""
    accepted = inspect.signature(block.forward).parameters
    kwargs = {"hidden_states": hidden, "temb": temb, **more}
    if getattr(block, "has_cross_attention", False):
        kwargs["encoder_hidden_states"] = ehs
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    return {k: v for k, v in kwargs.items() if k in accepted}


@dataclass
class LevelStash:
    """What a level keeps between the down pass and the up pass of one U-Net evaluation."""

    skips: list[torch.Tensor]  # the down block's input, then its resnets' outputs


# ---- the served-block protocol (served.py): one session per generation, down and up passes

EXTRA_KEYS = {"num_frames": int, "image_only_indicator": "tensor"}  # block arguments a client may set
FREEU_KEYS = ("s1", "s2", "b1", "b2")  # diffusers' FreeU factors: skip (s) and backbone (b) scales of two stages
MAX_FREEU = 10.0
MAX_FEATURE_BYTES = 2**34  # what a session may ask to keep captured (the session budget bounds it in practice)


def read_freeu(message: dict) -> dict | None:
    """A session's FreeU factors: absent/None (off), or each of s1, s2, b1, b2 a number in [0, MAX_FREEU]."""
    freeu = message.get("freeu")
    if freeu is None:
        return None
    if not isinstance(freeu, dict) or set(freeu) != set(FREEU_KEYS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_FREEU for v in freeu.values()):
        raise RequestError(f"freeu must map {', '.join(FREEU_KEYS)} to numbers in [0, {MAX_FREEU:g}]")
    return {key: float(freeu[key]) for key in FREEU_KEYS}


@dataclass(eq=False)
class LevelsSession(BlockSession):
    """One generation on a server's levels: what stays fixed for all its evaluations, and the evaluation in
    progress (its time embedding and the skips its down pass kept for the up pass)."""

    encoder_hidden_states: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    forward_upsample_size: bool = False
    latent_shift_frames: int | None = None  # frames folded in the batch to shift along (Latent-Shift)
    freeu: dict | None = None  # FreeU factors for this session's up passes (None: off)
    processors: dict = field(default_factory=dict)  # attention processors by layer name (unet_modifiers.py)
    conditioning_bytes: int = 0  # reserved for encoder hidden states (a down pass may replace them within it)
    features: unet_modifiers.FeatureStore | None = None  # features captured in this session (None: none asked)
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters and weights (unet_adapters.py; empty: base model)
    lora_scale: float = 1.0  # this evaluation's scale of them (its down request's)
    carry_skips: bool = False  # for comparison only: send skips back to the client instead of keeping them
    sample_shape: tuple[int, int, int, int] | None = None  # (batch, channels, height, width) at level 0, reserved
    temb: torch.Tensor | None = None
    stashes: dict[int, LevelStash] = field(default_factory=dict)
    sizes: dict[int, list[int]] = field(default_factory=dict)  # input size of each of our levels, this evaluation
    evaluations: int = 0

    @property
    def lora(self) -> unet_adapters.LoraChoice:
        return unet_adapters.LoraChoice(self.adapters, self.lora_scale)


def _ceil_half(size: list[int] | tuple[int, ...]) -> list[int]:
    return [-(-d // 2) for d in size]


class _LevelsProtocol(ServedBlocks):
    """UNetLevels' side of the served-block protocol (mixed into UNetLevels below)."""

    kind = "levels"
    session_steps = ("down", "up", *BACKWARD_STEPS)  # backward steps: unet_backward.py
    input_errors = (RuntimeError, ValueError, KeyError, IndexError)
    unet: nn.Module
    n: int

    def input_error_message(self, error: BaseException) -> str:
        return f"these inputs do not fit the U-Net's levels: {type(error).__name__}: {error}"

    def measured_request(self, flops: float, seconds: float) -> None:
        self.fold_speed(flops, seconds)  # measured on the evaluations served (and at start, where it could be)

    def reference_flops(self) -> tuple[float, int]:
        """Cost of one evaluation of our levels at the model's own sample size with guidance (batch 2), and its
        latent pixels: the unit of the speed a U-Net server announces."""
        size = self.unet.config.get("sample_size") or 64
        height, width = (size, size) if isinstance(size, int) else size
        return self.flops(2, self.level_size([height, width], self.start), self.start, self.end, 77), 2 * height * width

    def reference_session_bytes(self) -> int:
        """What a generation at the model's own sample size with guidance (batch 2, 77 text tokens) reserves."""
        size = self.unet.config.get("sample_size") or 64
        height, width = (size, size) if isinstance(size, int) else size
        element = torch.tensor([], dtype=self.compute_dtype).element_size()
        return self.skip_bytes(2, [height, width], self.start, self.end) + \
            2 * 77 * (self.cross_attention_width() or 0) * element

    def measure_at_start(self) -> SpanSpeed | None:
        """Time the down passes of our levels (and the mid block) once on random inputs at the reference size, and
        fold it into the measured speed, so that a new server announces a speed before its first request. Image
        U-Nets only: video ones need per-pipeline block arguments (frames), and learn it from the first requests."""
        if type(self.unet).__name__ != "UNet2DConditionModel":
            return None
        size = self.unet.config.get("sample_size") or 64
        height, width = (size, size) if isinstance(size, int) else size
        level_size = self.level_size([height, width], self.start)
        generator = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        width_ehs = self.cross_attention_width()
        sample = rand(2, self.level_channels(self.start), *level_size)
        temb, ehs = rand(2, self.temb_width() or 1), rand(2, 77, width_ehs) if width_ehs else None
        with torch.no_grad():
            started = time.perf_counter()
            for level in range(self.start, self.end):
                sample, _ = self.down(level, sample, temb, ehs, {})
            seconds = time.perf_counter() - started
        self.fold_speed(self.flops(2, level_size, self.start, self.end, 77, up=False), seconds)
        return self.announced_speed()

    def announced_speed(self) -> SpanSpeed | None:
        """Evaluations/s over our levels at the reference size, and latent pixels/s."""
        if not self.flops_per_second:
            return None
        flops, pixels = self.reference_flops()
        rate = self.flops_per_second / max(flops, 1.0)
        return SpanSpeed(inference_rps=rate, forward_tps=rate * pixels)

    # -- what the levels take

    def _level_blocks(self, level: int) -> list[nn.Module]:
        unet = self.unet
        if level == self.n:
            return [unet.mid_block] if unet.mid_block is not None else []
        return [unet.down_blocks[level], unet.up_blocks[self.n - 1 - level]]

    def level_channels(self, level: int) -> int:
        """Channels of the sample entering ``level``'s down block (or the mid block)."""
        block = self.unet.mid_block if level == self.n else self.unet.down_blocks[level]
        # ResnetBlock2D says so itself; SVD's SpatioTemporalResBlock through the spatial block it wraps
        return next(m.in_channels for m in block.resnets[0].modules()
                    if isinstance(getattr(m, "in_channels", None), int))

    def _skip_channels(self, level: int) -> list[int]:
        """Channels of each skip ``level`` keeps: its input, then each resnet's output."""
        block = self.unet.down_blocks[level]
        outs = [next(m.out_channels for m in resnet.modules() if isinstance(getattr(m, "out_channels", None), int))
                for resnet in block.resnets]
        return [self.level_channels(level), *outs]

    def _level_profile(self, level: int) -> tuple[int, list[tuple[bool, int]]]:
        """Parameters of the level's loaded blocks, and its spatial attention layers as (cross?, inner width)."""
        cache = self.__dict__.setdefault("_profiles", {})
        if level not in cache:
            params, attentions = 0, []
            for block in self._level_blocks(level):
                params += sum(p.numel() for p in block.parameters() if not p.is_meta)
                for name, module in block.named_modules():
                    to_q = getattr(module, "to_q", None)
                    if not isinstance(to_q, nn.Linear) or "temp" in name or "motion" in name:
                        continue  # temporal attention runs over frames: cheap next to space
                    attentions.append((bool(getattr(module, "is_cross_attention", False)), to_q.out_features))
            cache[level] = (params, attentions)
        return cache[level]

    def attention_names(self) -> list[str]:
        """The U-Net's attention layers, by name (processors may be set on any; ours are the ones that run)."""
        if "_attention_names" not in self.__dict__:
            self.__dict__["_attention_names"] = unet_modifiers.attention_names(self.unet)
        return self.__dict__["_attention_names"]

    def held_paths(self) -> list[str]:
        """The modules of our levels (``level_paths``)."""
        return [path for level in range(self.start, self.end) for path in level_paths(self.n, level)]

    def feature_places(self) -> tuple[list[str], set[str]]:
        """Every feature place of the U-Net, and those in our levels (where we capture and inject)."""
        if "_feature_places" not in self.__dict__:
            places = unet_modifiers.feature_places(self.unet)
            prefixes = tuple(f"{path}." for path in self.held_paths())
            self.__dict__["_feature_places"] = places, {p for p in places if p.startswith(prefixes)}
        return self.__dict__["_feature_places"]

    def read_features(self, message: dict, session: LevelsSession) -> unet_modifiers.Exchange | None:
        """A pass's feature captures and injections at our levels, checked before any compute."""
        if message.get("features") is None:
            return None
        known, mine = self.feature_places()
        try:
            request = unet_modifiers.FeatureRequest.from_message(message["features"], known).mine(mine)
            if request.empty:
                return None
            if session.features is None:
                raise unet_modifiers.FeatureError("this session keeps no features: open it with feature_bytes")
            exchange = unet_modifiers.Exchange(request, session.features)
            exchange.check()
        except ValueError as e:
            raise RequestError(str(e)) from None
        return exchange

    def cross_attention_width(self) -> int | None:
        """What our loaded cross-attention layers take as keys (temporal/motion self-attention does not count)."""
        for module in self.modules():
            to_k = getattr(module, "to_k", None)
            if getattr(module, "is_cross_attention", False) and isinstance(to_k, nn.Linear) \
                    and not to_k.weight.is_meta:
                return to_k.in_features
        return None

    def temb_width(self) -> int | None:
        """``in_features`` of the first loaded ``time_emb_proj``: the time embedding our blocks take."""
        for name, module in self.named_modules():
            if name.endswith("time_emb_proj") and isinstance(module, nn.Linear) and not module.weight.is_meta:
                return module.in_features
        return None

    def level_size(self, size: list[int], level: int) -> list[int]:
        """The sample's height and width at ``level`` from its size at level 0 (each down block but the last
        halves it, rounding up)."""
        for _ in range(min(level, self.n - 1)):
            size = _ceil_half(size)
        return list(size)

    def skip_bytes(self, batch: int, size: list[int], start: int, end: int) -> int:
        """Bytes of the skips levels [start, end) keep for one evaluation of a sample of ``size`` at level 0."""
        element = torch.tensor([], dtype=self.compute_dtype).element_size()
        total = 0
        for level in range(start, min(end, self.n)):
            height, width = self.level_size(size, level)
            total += batch * height * width * sum(self._skip_channels(level))
        return total * element

    def flops(self, batch: int, size: list[int], start: int, end: int, encoder_tokens: int,
              down: bool = True, up: bool = True) -> float:
        """Estimated cost of running levels [start, end) on a sample of ``size`` at level ``start``: convolutions
        and linear layers (2 x parameters x pixels; split evenly between the passes) and spatial attention (4 x
        batch x tokens x keys x width per layer; cheap temporal attention left out)."""
        total, size_here = 0.0, list(size)
        for level in range(start, end):
            params, attentions = self._level_profile(level)
            tokens = size_here[0] * size_here[1]
            share = (0.5 if down else 0.0) + (0.5 if up else 0.0) if level < self.n else (1.0 if down else 0.0)
            total += share * 2.0 * params * batch * tokens
            for cross, width in attentions:
                keys = encoder_tokens if cross else tokens
                total += share * 4.0 * batch * tokens * keys * width
            if level < self.n - 1:
                size_here = _ceil_half(size_here)
        return total

    # -- sessions

    def _read_ehs(self, message: dict, bounds: Bounds) -> torch.Tensor | None:
        ehs = read_float_tensor(message, "encoder_hidden_states", bounds.max_numel, 3, required=False,
                                layout="batch, tokens, width")
        width = self.cross_attention_width()
        if ehs is not None and width is not None and ehs.shape[-1] != width:
            raise RequestError(f"encoder_hidden_states have width {ehs.shape[-1]}; this U-Net attends to {width}")
        if ehs is not None and ehs.shape[1] > bounds.max_encoder_tokens:
            raise RequestError(f"encoder_hidden_states hold {ehs.shape[1]} tokens per row; this server takes at most "
                               f"{bounds.max_encoder_tokens}")
        return ehs

    def open_session(self, message: dict, bounds: Bounds) -> LevelsSession:
        start, end = read_block_range(message, self.start, self.end)
        ehs = self._read_ehs(message, bounds)
        frames = get_field(message, "latent_shift_frames", int, default=None)
        if frames is not None and frames <= 0:
            raise RequestError("latent_shift_frames must be positive")
        shape = self._read_sample_shape(message, ehs, bounds)
        element = torch.tensor([], dtype=self.compute_dtype).element_size()
        feature_bytes = get_field(message, "feature_bytes", int, default=0)
        if not 0 <= feature_bytes <= MAX_FEATURE_BYTES:
            raise RequestError(f"feature_bytes must be in [0, {MAX_FEATURE_BYTES}]")
        try:
            processors = unet_modifiers.read_processors(message.get("processors"), self.attention_names())
        except ValueError as e:
            raise RequestError(str(e)) from None
        # conditioning for the declared batch: a session may be given other conditioning later (reconditioning)
        conditioning = ehs.numel() * element * -(-shape[0] // ehs.shape[0]) if ehs is not None else 0
        reserved = self.skip_bytes(shape[0], list(shape[2:]), start, end) + conditioning + feature_bytes
        return LevelsSession(start, end, reserved, read_codec(message, "output_codec"), blocks=self,
                             processors=processors, conditioning_bytes=conditioning,
                             adapters=unet_adapters.read_adapters(message, self.adapter_names),
                             features=unet_modifiers.FeatureStore(feature_bytes) if feature_bytes else None,
                             encoder_hidden_states=ehs,
                             extra=self._read_extra(message.get("extra") or {}, bounds),
                             forward_upsample_size=get_field(message, "forward_upsample_size", bool, default=False),
                             latent_shift_frames=frames, sample_shape=shape, freeu=read_freeu(message),
                             carry_skips=get_field(message, "carry_skips", bool, default=False))

    def _read_sample_shape(self, message: dict, ehs: torch.Tensor | None, bounds: Bounds) -> tuple[int, ...]:
        """The declared (batch, channels, height, width) of the samples at level 0; without one, the model's own
        sample size and the encoder states' batch (clients of the previous version did not declare it)."""
        shape = message.get("sample_shape")
        if shape is None:
            size = self.unet.config.get("sample_size") or 64
            height, width = (size, size) if isinstance(size, int) else size
            batch = ehs.shape[0] if ehs is not None else 2
            return batch, self.level_channels(0) if self.start == 0 else 0, height, width
        if not (isinstance(shape, list) and len(shape) == 4 and all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise RequestError("sample_shape must be [batch, channels, height, width] of positive integers")
        batch, _, height, width = shape
        if batch * height * width > bounds.max_sample_pixels:
            raise RequestError(f"sample_shape {shape}: batch x height x width must be at most "
                               f"{bounds.max_sample_pixels}")
        self._check_attention_size([height, width], bounds)
        return tuple(shape)

    def _check_attention_size(self, size: list[int], bounds: Bounds) -> None:
        """Attention cost grows with the square of an image's positions: bound them at each level we attend at."""
        for level in range(self.start, self.end):
            if self._level_profile(level)[1]:
                height, width = self.level_size(size, level)
                if height * width > bounds.max_attention_tokens:
                    raise RequestError(f"a {size[0]}x{size[1]} latent attends over {height * width} positions at "
                                       f"level {level} (limit {bounds.max_attention_tokens}); use a smaller image")

    @staticmethod
    def _read_extra(extra: object, bounds: Bounds) -> dict:
        if not isinstance(extra, dict):
            raise RequestError("extra must be a map")
        result = {}
        for key, value in extra.items():
            kind = EXTRA_KEYS.get(key)
            if kind is None:
                raise RequestError(f"unsupported block argument {key!r}; supported: {sorted(EXTRA_KEYS)}")
            if kind == "tensor":
                result[key] = read_tensor(extra, key, bounds.max_numel)
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RequestError(f"{key} must be a positive integer")
            else:
                result[key] = value
        return result

    # -- passes

    def prepare(self, kind: str, message: dict, session: BlockSession | None, bounds: Bounds) -> Prepared:
        if kind in BACKWARD_STEPS and isinstance(session, LevelsSession):  # training: input gradients
            return prepare_backward(self, kind, message, session, bounds)
        if not isinstance(session, LevelsSession) or kind not in ("down", "up"):
            raise RequestError(f"U-Net levels serve 'down' and 'up' passes in a session, not {kind!r}")
        sample = read_float_tensor(message, "sample", bounds.max_numel, 4, layout="batch, channels, height, width")
        if kind == "down" and ("encoder_hidden_states" in message or "extra" in message):
            self._recondition(message, session, bounds)
        batch, size = sample.shape[0], list(sample.shape[2:])
        if batch * size[0] * size[1] > bounds.max_sample_pixels:
            raise RequestError(f"sample of {list(sample.shape)}: batch x height x width must be at most "
                               f"{bounds.max_sample_pixels}")
        ehs = session.encoder_hidden_states
        if ehs is not None and ehs.shape[0] != batch:
            raise RequestError(f"sample batch {batch} differs from the encoder hidden states' {ehs.shape[0]}")
        if session.latent_shift_frames and batch % session.latent_shift_frames:
            raise RequestError(f"sample batch {batch} is not a multiple of latent_shift_frames "
                               f"{session.latent_shift_frames}")
        sizes = read_sizes(message)
        encoder_tokens = ehs.shape[1] if ehs is not None else 0
        return (self._prepare_down if kind == "down" else self._prepare_up)(
            message, session, sample, sizes, encoder_tokens, bounds)

    def _recondition(self, message: dict, session: LevelsSession, bounds: Bounds) -> None:
        """New conditioning for this and the following evaluations (another prompt or image: e.g. a video edit's
        inversion, then its generation, in one session that keeps the features captured meanwhile)."""
        ehs = self._read_ehs(message, bounds)
        element = torch.tensor([], dtype=self.compute_dtype).element_size()
        if ehs is not None and ehs.numel() * element > session.conditioning_bytes:
            raise RequestError(f"encoder_hidden_states of {list(ehs.shape)} exceed the {session.conditioning_bytes} "
                               "bytes this session reserved for conditioning (declare a larger sample_shape batch)")
        extra = self._read_extra(message.get("extra") or {}, bounds)
        session.encoder_hidden_states, session.extra = ehs, extra

    def _check_chain(self, sizes: list[list[int]], level: int, size: list[int]) -> None:
        """The sizes the client reports for the levels before ``level`` must lead down to ``size`` (each level
        halving, rounding up): they decide the upsampling sizes, so they must stay within the U-Net's geometry."""
        expected = list(size)
        for index in reversed(range(level)):
            # every down block but the last halves the size
            below = _ceil_half(sizes[index]) if index < self.n - 1 else list(sizes[index])
            if below != expected:
                raise RequestError(f"input_sizes {sizes[:level]} do not lead down to the sample's {size} at level "
                                   f"{level}")
            expected = sizes[index]

    def _reserve(self, session: LevelsSession, batch: int, size_at_start: list[int]) -> None:
        """The sample must fit what the session reserved at open (the skips kept between the passes)."""
        declared = session.sample_shape
        if declared is None:
            return
        size0 = declared[2:]
        if batch > declared[0] or any(a > b for a, b in zip(size_at_start, self.level_size(list(size0), session.start),
                                                            strict=True)):
            raise RequestError(f"sample of batch {batch} and size {size_at_start} at level {session.start} exceeds "
                               f"the session's declared sample_shape {list(declared)}")

    def _prepare_down(self, message: dict, session: LevelsSession, sample: torch.Tensor, sizes: list,
                      encoder_tokens: int, bounds: Bounds) -> Prepared:
        batch, size = sample.shape[0], list(sample.shape[2:])
        lora_scale = unet_adapters.read_scale(message)
        if len(sizes) != session.start:
            raise RequestError(f"input_sizes must list the {session.start} levels before ours, got {len(sizes)}")
        self._check_chain(sizes, session.start, size)
        temb = read_float_tensor(message, "temb", bounds.max_numel, 2, layout="batch, width")
        if temb.shape[0] != batch:
            raise RequestError(f"temb must be a (batch, width) tensor with batch {batch}")
        temb_width = self.temb_width()
        if temb_width is not None and temb.shape[1] != temb_width:
            raise RequestError(f"temb has width {temb.shape[1]}; this U-Net's blocks take {temb_width}")
        expected = self.level_channels(session.start)
        if sample.shape[1] != expected:
            raise RequestError(f"sample has {sample.shape[1]} channels, level {session.start} takes {expected}")
        self._check_attention_size(size if session.start == 0 else self._size_at_zero(sizes, size), bounds)
        self._reserve(session, batch, size)
        went_up = session.end == self.n + 1  # we hold the mid level: go straight back up through our levels
        flops = self.flops(batch, size, session.start, session.end, encoder_tokens, down=True, up=went_up)
        self.check_cost(flops, bounds)
        exchange = self.read_features(message, session)

        def run():
            session.lora_scale = lora_scale  # for this evaluation's up pass too
            out_sizes, stashes = [list(s) for s in sizes], {}
            session.sizes = {}
            current = sample
            for level in range(session.start, session.end):
                if level > session.start:
                    yield
                if level < self.n:
                    out_sizes.append(list(current.shape[-2:]))
                    session.sizes[level] = list(current.shape[-2:])
                with torch.no_grad(), latent_shift.active(session.latent_shift_frames), \
                        unet_modifiers.active(session.processors, exchange):
                    current, stash = self.down(level, current, temb, session.encoder_hidden_states, session.extra,
                                               session.lora)
                if stash is not None:
                    stashes[level] = stash
            session.temb, session.stashes = temb, stashes
            if went_up:
                yield
                current = yield from self._up_pieces(session, current, out_sizes, exchange)
            if exchange is not None:  # only a pass that completed keeps what it captured
                exchange.commit()
            return current, out_sizes

        def finish(result) -> tuple[dict, dict[str, torch.Tensor]]:
            output, out_sizes = result
            fields = {"input_sizes": out_sizes, "went_up": went_up}
            tensors = {"sample": output}
            if session.carry_skips and session.stashes:  # a linear chain's traffic, for comparison
                fields["skips"] = {str(level): [serialize_tensor(t, session.output_codec) for t in stash.skips]
                                   for level, stash in session.stashes.items()}
                fields["temb"] = serialize_tensor(session.temb, "none")
                session.stashes, session.temb = {}, None
            return fields, tensors

        return Prepared(run, flops, batch, finish, sample.dtype, extra={"evaluated": went_up})

    def _size_at_zero(self, sizes: list, size: list[int]) -> list[int]:
        return list(sizes[0]) if sizes else list(size)

    def _prepare_up(self, message: dict, session: LevelsSession, sample: torch.Tensor, sizes: list,
                    encoder_tokens: int, bounds: Bounds) -> Prepared:
        if session.carry_skips and isinstance(message.get("skips"), dict):  # given back by the client
            try:
                session.stashes = {int(level): LevelStash([deserialize_tensor(t, bounds.max_numel) for t in tensors])
                                   for level, tensors in message["skips"].items()}
                session.temb = deserialize_tensor(message.get("temb"), bounds.max_numel)
                session.sizes = {level: list(stash.skips[0].shape[-2:]) for level, stash in session.stashes.items()}
            except (PayloadError, ValueError, TypeError, IndexError) as e:
                raise RequestError(f"bad skips: {e}") from None
        top = min(session.end, self.n)
        if session.temb is None or len(sizes) < top or any(level not in session.stashes
                                                           for level in range(session.start, top)):
            raise RequestError("an 'up' pass needs the 'down' pass of the same evaluation first")
        if session.temb.shape[0] != sample.shape[0]:
            raise RequestError(f"sample batch {sample.shape[0]} differs from the down pass's {session.temb.shape[0]}")
        # Our own levels' sizes are the ones we saw; the client's account of the levels before ours must lead
        # down to our first one.
        sizes = [list(s) for s in sizes[:session.start]] + [session.sizes[level] for level in
                                                             range(session.start, top)]
        self._check_chain(sizes, session.start, session.sizes[session.start])
        flops = self.flops(sample.shape[0], session.sizes[session.start], session.start, top, encoder_tokens,
                           down=False, up=True)
        self.check_cost(flops, bounds)
        exchange = self.read_features(message, session)

        def run():
            output = yield from self._up_pieces(session, sample, sizes, exchange)
            if exchange is not None:
                exchange.commit()
            return output

        return Prepared(run, flops, sample.shape[0], lambda output: ({}, {"sample": output}), sample.dtype,
                        extra={"evaluated": True})

    def _up_pieces(self, session: LevelsSession, sample: torch.Tensor, sizes: list,
                   exchange: unet_modifiers.Exchange | None = None):
        """The up pass through our levels, one level a piece. Per-thread state (grad mode, Latent-Shift's frames)
        is set around each level, never across a yield, where it would leak into another job's piece."""
        for number, level in enumerate(reversed(range(session.start, min(session.end, self.n)))):
            if number:
                yield
            size = self.upsample_size(level, [tuple(s) for s in sizes], session.forward_upsample_size)
            stash = session.stashes.pop(level)
            with torch.no_grad(), latent_shift.active(session.latent_shift_frames), \
                    unet_modifiers.active(session.processors, exchange):
                sample = self.up(level, sample, session.temb, session.encoder_hidden_states, session.extra, stash, size,
                                 freeu=session.freeu, lora=session.lora)
        session.temb = None
        session.evaluations += 1
        return sample


class UNetLevels(_LevelsProtocol, nn.Module):
    """Levels [start, end) of a U-Net (level i < n: down block i + up block n-1-i; level n: mid)."""

    def __init__(self, unet: nn.Module, start: int, end: int):
        super().__init__()
        self.unet, self.start, self.end = unet, start, end
        self.n = len(unet.down_blocks)
        self.compute_device = torch.device("cpu")  # where the loaded blocks live (the rest stays on meta)
        self.compute_dtype = torch.float32  # what they compute in
        self.adapter_names: list[str] = []  # LoRA adapters served beside the base weights (load_adapters)
        self._lora_layers: list = []
        self._lora_in_use: unet_adapters.LoraChoice | None = unet_adapters.BASE  # None: unknown, set it next call

    def _on_device(self, value):
        """Requests arrive on the CPU in the client's dtype; a CUDA server computes on its GPU, a bfloat16 server
        in bfloat16 (the handler casts outputs back)."""
        if isinstance(value, torch.Tensor):
            return value.to(self.compute_device, self.compute_dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, dict):
            return {key: self._on_device(item) for key, item in value.items()}
        return value

    @classmethod
    def from_pretrained(cls, source: ModelSource, start: int, end: int, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> UNetLevels:
        """Load only the blocks of levels [start, end) from a pipeline directory (``unet/``) or a U-Net one."""
        config, subfolder = load_unet_config(source)
        unet = build_unet_skeleton(config)
        n = len(unet.down_blocks)
        if not 0 <= start < end <= n + 1:
            raise ValueError(f"levels {start}:{end} are outside the U-Net's 0:{n + 1}")
        check_pairing(unet)
        checkpoint = Checkpoint(source, subfolder=subfolder, stem="diffusion_pytorch_model")
        for level in range(start, end):
            for path in level_paths(n, level):
                module = unet.get_submodule(path).to(dtype).to_empty(device=device)
                module.load_state_dict(checkpoint.load_module(path, dtype), strict=True)
        levels = cls(unet, start, end).eval()
        levels.compute_device, levels.compute_dtype = torch.device(device), dtype
        levels.requires_grad_(False)
        latent_shift.install(levels)  # inactive unless a session asks for it
        unet_modifiers.install(levels.unet)  # likewise: processors and feature exchange per session
        levels.opened_files = sorted(checkpoint.opened_files)
        return levels

    def load_adapters(self, specs: list[str]) -> None:
        """Serve the LoRA adapters of ``specs`` beside the base weights (unet_adapters.py); sessions choose."""
        self.adapter_names = unet_adapters.load_unet_adapters(specs, self.unet, self.held_paths())
        self._lora_layers = unet_adapters.lora_layers(self.unet)
        self._lora_in_use = None  # diffusers left the last one loaded active

    def _use_lora(self, choice: unet_adapters.LoraChoice | None) -> None:
        """Set a call's adapters on the LoRA layers (set per call, like FreeU: calls of sessions interleave)."""
        choice = choice or unet_adapters.BASE
        if self._lora_layers and choice != self._lora_in_use:
            unet_adapters.select(self._lora_layers, choice)
            self._lora_in_use = choice

    def down(self, level: int, sample: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None,
             extra: dict, lora: unet_adapters.LoraChoice | None = None) -> tuple[torch.Tensor, LevelStash | None]:
        sample, temb, ehs, extra = (self._on_device(x) for x in (sample, temb, ehs, extra))
        self._use_lora(lora)
        if level == self.n:
            mid = self.unet.mid_block
            return (sample if mid is None else mid(**_block_kwargs(mid, sample, temb, ehs, extra))), None
        block = self.unet.down_blocks[level]
        output, res_samples = block(**_block_kwargs(block, sample, temb, ehs, extra))
        # The downsampler's output, when there is one, is the next level's input (its first skip): not ours.
        resnet_outputs = list(res_samples[: len(block.resnets)])
        return output, LevelStash([sample, *resnet_outputs])

    def up(self, level: int, sample: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None, extra: dict,
           stash: LevelStash, upsample_size: tuple[int, int] | None, freeu: dict | None = None,
           lora: unet_adapters.LoraChoice | None = None) -> torch.Tensor:
        sample, temb, ehs, extra = (self._on_device(x) for x in (sample, temb, ehs, extra))
        self._use_lora(lora)
        skips = tuple(self._on_device(skip) for skip in stash.skips)
        block = self.unet.up_blocks[self.n - 1 - level]
        # the block reads FreeU's factors from its attributes (diffusers' enable_freeu sets them): set for this
        # call alone, every call, so one session's factors never reach another's
        for key in FREEU_KEYS:
            setattr(block, key, freeu[key] if freeu else None)
        return block(**_block_kwargs(block, sample, temb, ehs, extra, res_hidden_states_tuple=skips,
                                     upsample_size=upsample_size))

    def upsample_size(self, level: int, input_sizes: list[tuple[int, int]], head_forwards: bool) -> tuple | None:
        """What the monolithic forward passes up block n-1-``level``: the input size of the level below, when the
        latent size is not a multiple of the upsampling factor (and never for the last up block)."""
        if level == 0 or not head_forwards:
            return None
        return tuple(input_sizes[level - 1])


def load_unet_config(source: ModelSource) -> tuple[dict, str | None]:
    """The U-Net's config and its subfolder: ``unet/`` of a pipeline directory, or the directory itself."""
    index = source.fetch("model_index.json", required=False)
    subfolder = "unet" if index is not None else None
    path = source.fetch(f"{subfolder}/config.json" if subfolder else "config.json")
    config = json.loads(path.read_text())
    unet_class(config)  # refuses unsupported classes early
    return config, subfolder


def is_unet_source(source: ModelSource) -> bool:
    try:
        load_unet_config(source)
        return True
    except (FileNotFoundError, NotImplementedError, json.JSONDecodeError):
        return False


def build_unet_skeleton(config: dict) -> nn.Module:
    """The U-Net's modules on the meta device: structure without memory."""
    cls = unet_class(config)
    with torch.device("meta"):
        return cls.from_config(config)


class _RemoteBlock(nn.Module):
    """Stands for a block computed elsewhere: holds no weights, and must never be called. What a diffusers user
    would do to a block (hooks, its submodules, FreeU's factors) is refused with a clear error rather than accepted
    and silently ignored."""

    def __init__(self, block: nn.Module):
        super().__init__()
        # the monolithic forward decides which arguments a block gets from this flag
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    def forward(self, *args, **kwargs):
        raise RuntimeError("this U-Net block runs in the swarm, not here")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(f"{name!r}: this U-Net block runs in the swarm; its submodules and settings "
                                 "(resnets, attentions, processors, FreeU factors) are on the servers") from None

    def _refuse_hook(self, *args, **kwargs):
        raise NotImplementedError("a hook on a U-Net block that runs in the swarm would never fire here; hook the "
                                  "U-Net itself (its input and output are computed locally)")

    register_forward_hook = register_forward_pre_hook = _refuse_hook
    register_full_backward_hook = register_full_backward_pre_hook = _refuse_hook


def up_factor(unet: nn.Module) -> int:
    """Total upsampling of the up path: latent sizes that are not a multiple need explicit upsample sizes."""
    stored = getattr(unet, "swarm_up_factor", None)
    return stored or 2 ** sum(1 for block in unet.up_blocks if getattr(block, "upsamplers", None))


def load_head_and_tail(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The U-Net's head and tail, loaded, for the client; its blocks are weightless stand-ins (servers run them)."""
    config, subfolder = load_unet_config(source)
    unet = build_unet_skeleton(config)
    check_pairing(unet)
    # what the client may name in processors and feature requests, read before the blocks become stand-ins
    unet.swarm_attention_names = unet_modifiers.attention_names(unet)
    unet.swarm_feature_places = unet_modifiers.feature_places(unet)
    unet.swarm_up_factor = up_factor(unet)
    unet.swarm_num_levels = num_levels(unet)
    unet.down_blocks = nn.ModuleList(_RemoteBlock(block) for block in unet.down_blocks)
    unet.up_blocks = nn.ModuleList(_RemoteBlock(block) for block in unet.up_blocks)
    if unet.mid_block is not None:
        unet.mid_block = _RemoteBlock(unet.mid_block)
    checkpoint = Checkpoint(source, subfolder=subfolder, stem="diffusion_pytorch_model")
    for name, child in unet.named_children():
        if name in ("down_blocks", "up_blocks", "mid_block") or child is None:
            continue
        state = {k: v for k, v in checkpoint.load_prefix(name + ".", dtype).items()}
        materialized = child.to(dtype).to_empty(device="cpu")
        materialized.load_state_dict(state, strict=True)
        setattr(unet, name, materialized)
    for name, buffer in list(unet.named_buffers(recurse=False)):
        if buffer.is_meta:
            raise NotImplementedError(f"U-Net buffer {name} is not supported by the splitter")
    return unet.eval().requires_grad_(False)

