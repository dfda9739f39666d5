"""Serving U-Net levels: one session per generation, two passes per U-Net evaluation.

``open`` brings what stays fixed for a whole generation (encoder hidden states, extra block arguments), cached
with the session. Then each evaluation is a ``down`` message (run the down blocks of our levels, keep their
skips; the server holding the mid level goes straight on up) and, for the others, an ``up`` message once the
deeper servers are done. Skips never leave the server: only ``sample`` (and the small time embedding) travels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from swarm.blocks import latent_shift
from swarm.blocks.unet import LevelStash, UNetLevels
from swarm.compression import PayloadError, deserialize_tensor
from swarm.rpc import protocol
from swarm.rpc.framing import write_message
from swarm.rpc.protocol import RequestError, get_field
from swarm.server.handler import HandlerBase
from swarm.server.throughput import SpanSpeed
from swarm.server.validation import read_block_range, read_tensor

logger = logging.getLogger(__name__)

MAX_NUMEL = 2**28  # elements in one tensor of a request
# batch x height x width of a sample: bounds the compute one evaluation can ask for (SDXL at 1024 px with guidance
# is 2 x 128 x 128 = 32768; 16 frames of 96 x 96 latents with guidance 294912)
MAX_SAMPLE_PIXELS = 2**20
EXTRA_KEYS = {"num_frames": int, "image_only_indicator": "tensor"}  # block arguments a client may set


@dataclass
class DiffusionSession:
    start: int
    end: int
    encoder_hidden_states: torch.Tensor | None
    extra: dict
    forward_upsample_size: bool
    output_codec: str
    latent_shift_frames: int | None = None  # frames folded in the batch to shift along (Latent-Shift)
    carry_skips: bool = False  # for comparison only: send skips back to the client instead of keeping them
    temb: torch.Tensor | None = None  # of the evaluation in progress
    stashes: dict[int, LevelStash] = field(default_factory=dict)  # skips of the evaluation in progress
    evaluations: int = 0
    compute_seconds: float = 0.0  # of the evaluation in progress, on the compute thread
    pixels: int = 0  # batch x height x width of its sample at our first level


class UNetHandler(HandlerBase):
    """Serves U-Net levels. Their speed is measured on the evaluations served (a synthetic run would need each
    U-Net class's own conditioning inputs): seconds per evaluation over our levels, scaled to a reference size
    (batch 2, as with classifier-free guidance, at the model's sample size) and averaged (EMA)."""

    span: UNetLevels

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_sessions = 0
        self.served = {"down": 0, "up": 0}
        size = self.span.unet.config.get("sample_size") or 64
        self.reference_pixels = 2 * (size * size if isinstance(size, int) else size[0] * size[1])
        self.evaluation_seconds: float | None = None  # EMA, at the reference size
        # What our levels' blocks take, for clear errors before any compute (None: no such layer here)
        self._temb_width = _first_in_features(self.span, "time_emb_proj")
        self._cross_attention_width = _cross_attention_width(self.span)

    def measured_speed(self) -> SpanSpeed | None:
        """Evaluations/s over our levels at the reference size, and latent pixels/s (announced like an LLM span's
        decode steps/s and tokens/s), once some evaluation was served."""
        if not self.evaluation_seconds:
            return None
        return SpanSpeed(inference_rps=1 / self.evaluation_seconds,
                         forward_tps=self.reference_pixels / self.evaluation_seconds)

    def _evaluated(self, session: DiffusionSession) -> None:
        seconds = session.compute_seconds * self.reference_pixels / max(session.pixels, 1)
        old = self.evaluation_seconds
        self.evaluation_seconds = seconds if old is None else 0.8 * old + 0.2 * seconds

    def rpcs(self) -> dict[str, Callable[..., Awaitable[None]]]:
        return {**super().rpcs(), protocol.DIFFUSION: self.rpc_diffusion}

    async def rpc_diffusion(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await self.read_request(reader)
        if message is None:
            return
        if get_field(message, "type", str) != "open":
            raise RequestError(f"expected an 'open' message, got {message.get('type')!r}")
        levels = self.span
        if self.active_sessions >= self.limits.max_diffusion_sessions:
            raise RequestError(f"this server already runs {self.active_sessions} generations; try another")
        session = self._open(message, levels)
        self.active_sessions += 1
        try:
            await write_message(writer, {"opened": True, "levels": [session.start, session.end]})
            while True:
                try:
                    message = await asyncio.wait_for(self.read_request(reader), self.limits.session_timeout)
                except TimeoutError:
                    raise RequestError(f"session idle for {self.limits.session_timeout:.0f} s; closed") from None
                if message is None or message.get("type") == "close":
                    return
                try:
                    reply = await self._evaluate(peer, session, levels, message)
                except RequestError as e:  # refused; the session stays usable
                    reply = {"error": str(e)}
                reply["step_id"] = message.get("step_id")
                await write_message(writer, reply)
        finally:
            self.active_sessions -= 1

    def _open(self, message: dict, levels: UNetLevels) -> DiffusionSession:
        start, end = read_block_range(message, levels.start, levels.end)
        ehs = read_tensor(message, "encoder_hidden_states", MAX_NUMEL, required=False)
        if ehs is not None and (not ehs.is_floating_point() or ehs.dim() != 3 or not torch.isfinite(ehs).all()):
            raise RequestError("encoder_hidden_states must be a finite float tensor (batch, tokens, width)")
        width = self._cross_attention_width
        if ehs is not None and width is not None and ehs.shape[-1] != width:
            raise RequestError(f"encoder_hidden_states have width {ehs.shape[-1]}; this U-Net attends to {width}")
        extra = self._read_extra(message.get("extra") or {})
        frames = get_field(message, "latent_shift_frames", int, default=None)
        if frames is not None and frames <= 0:
            raise RequestError("latent_shift_frames must be positive")
        return DiffusionSession(start, end, ehs, extra, bool(get_field(message, "forward_upsample_size", bool,
                                                                      default=False)),
                                self.output_codec(message), latent_shift_frames=frames,
                                carry_skips=get_field(message, "carry_skips", bool, default=False))

    @staticmethod
    def _read_extra(extra: object) -> dict:
        if not isinstance(extra, dict):
            raise RequestError("extra must be a map")
        result = {}
        for key, value in extra.items():
            kind = EXTRA_KEYS.get(key)
            if kind is None:
                raise RequestError(f"unsupported block argument {key!r}; supported: {sorted(EXTRA_KEYS)}")
            if kind == "tensor":
                try:
                    result[key] = deserialize_tensor(value, max_numel=MAX_NUMEL)
                except PayloadError as e:
                    raise RequestError(f"bad tensor {key!r}: {e}") from None
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RequestError(f"{key} must be a positive integer")
            else:
                result[key] = value
        return result

    async def _evaluate(self, peer: str, session: DiffusionSession, levels: UNetLevels, message: dict) -> dict:
        kind = get_field(message, "type", str)
        if kind not in ("down", "up"):
            raise RequestError(f"expected 'down', 'up' or 'close', got {kind!r}")
        sample = read_tensor(message, "sample", MAX_NUMEL)
        if sample.dim() != 4 or not sample.is_floating_point() or not torch.isfinite(sample).all():
            raise RequestError(f"sample must be a finite float tensor (batch, channels, height, width), got "
                               f"{sample.dtype} {list(sample.shape)}")
        batch, pixels = sample.shape[0], sample.shape[0] * sample.shape[2] * sample.shape[3]
        if pixels == 0 or pixels > MAX_SAMPLE_PIXELS:
            raise RequestError(f"sample of {list(sample.shape)}: batch x height x width must be in 1..."
                               f"{MAX_SAMPLE_PIXELS}")
        ehs = session.encoder_hidden_states
        if ehs is not None and ehs.shape[0] != batch:
            raise RequestError(f"sample batch {batch} differs from the encoder hidden states' {ehs.shape[0]}")
        if session.latent_shift_frames and batch % session.latent_shift_frames:
            raise RequestError(f"sample batch {batch} is not a multiple of latent_shift_frames "
                               f"{session.latent_shift_frames}")
        sizes = message.get("input_sizes")
        if not isinstance(sizes, list) or not all(isinstance(s, list) and len(s) == 2 and
                                                  all(isinstance(d, int) and d > 0 for d in s) for s in sizes):
            raise RequestError("input_sizes must be a list of [height, width]")
        codec = self.output_codec(message, default=session.output_codec)
        if kind == "down":
            if len(sizes) != session.start:
                raise RequestError(f"input_sizes must list the {session.start} levels before ours, got {len(sizes)}")
            temb = read_tensor(message, "temb", MAX_NUMEL)
            if temb.dim() != 2 or temb.shape[0] != sample.shape[0] or not torch.isfinite(temb).all():
                raise RequestError(f"temb must be a finite (batch, width) tensor with batch {sample.shape[0]}")
            if self._temb_width is not None and temb.shape[1] != self._temb_width:
                raise RequestError(f"temb has width {temb.shape[1]}; this U-Net's blocks take {self._temb_width}")
            self._check_channels(levels, session.start, sample)
            session.pixels = pixels  # what this evaluation's time is scaled by
            output, sizes, went_up = await self._run(peer, lambda: self._down(session, levels, sample, temb,
                                                                               sizes))
            self.count("down")
            if went_up:
                self._evaluated(session)
            reply = {"sample": self.encode(output.to(sample.dtype), codec), "input_sizes": sizes, "went_up": went_up}
            if session.carry_skips and session.stashes:  # a linear chain's traffic, for comparison
                reply["skips"] = {str(level): [self.encode(t, codec) for t in stash.skips]
                                  for level, stash in session.stashes.items()}
                reply["temb"] = self.encode(session.temb, "none")
                session.stashes, session.temb = {}, None
            return reply
        if session.carry_skips and isinstance(message.get("skips"), dict):  # given back by the client
            try:
                session.stashes = {int(level): LevelStash([deserialize_tensor(t, MAX_NUMEL) for t in tensors])
                                   for level, tensors in message["skips"].items()}
                session.temb = deserialize_tensor(message.get("temb"), MAX_NUMEL)
            except (PayloadError, ValueError, TypeError) as e:
                raise RequestError(f"bad skips: {e}") from None
        if session.temb is None or len(sizes) < min(session.end, levels.n):
            raise RequestError("an 'up' pass needs the 'down' pass of the same evaluation first")
        output = await self._run(peer, lambda: self._up(session, levels, sample, sizes))
        self.count("up")
        self._evaluated(session)
        return {"sample": self.encode(output.to(sample.dtype), codec)}

    async def _run(self, peer: str, work):
        """The levels on inputs that passed the checks above. What the blocks still cannot take (e.g. an 'up'
        sample that does not fit the skips kept from the 'down' pass) is the request's fault: an error for this
        caller, and the session stays usable for its next evaluation."""
        try:
            return await self.compute(peer, work)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise RequestError(f"these inputs do not fit the U-Net's levels: {type(e).__name__}: {e}") from None

    @staticmethod
    def _check_channels(levels: UNetLevels, level: int, sample: torch.Tensor) -> None:
        unet = levels.unet
        block = unet.mid_block if level == levels.n else unet.down_blocks[level]
        # ResnetBlock2D says so itself; SVD's SpatioTemporalResBlock through the spatial block it wraps
        expected = next(m.in_channels for m in block.resnets[0].modules() if isinstance(getattr(m, "in_channels",
                                                                                                 None), int))
        if sample.shape[1] != expected:
            raise RequestError(f"sample has {sample.shape[1]} channels, level {level} takes {expected}")

    # Both passes run on the compute thread as generators that yield between levels (compute.py: other peers'
    # work may run there). Per-thread state (grad mode, Latent-Shift's frames) is set around each level, never
    # across a yield, where it would leak into the next job's piece.

    @staticmethod
    def _down(session: DiffusionSession, levels: UNetLevels, sample: torch.Tensor, temb: torch.Tensor,
              sizes: list):
        sizes, stashes = [list(s) for s in sizes], {}
        session.compute_seconds = 0.0
        for level in range(session.start, session.end):
            if level > session.start:
                yield
            started = time.perf_counter()
            if level < levels.n:
                sizes.append(list(sample.shape[-2:]))
            with torch.no_grad(), latent_shift.active(session.latent_shift_frames):
                sample, stash = levels.down(level, sample, temb, session.encoder_hidden_states, session.extra)
            if stash is not None:
                stashes[level] = stash
            session.compute_seconds += time.perf_counter() - started
        session.temb, session.stashes = temb, stashes
        went_up = session.end == levels.n + 1  # we hold the mid level: go straight back up through our levels
        if went_up:
            yield
            sample = yield from UNetHandler._up(session, levels, sample, sizes)
        return sample, sizes, went_up

    @staticmethod
    def _up(session: DiffusionSession, levels: UNetLevels, sample: torch.Tensor, sizes: list):
        for number, level in enumerate(reversed(range(session.start, min(session.end, levels.n)))):
            if number:
                yield
            started = time.perf_counter()
            size = levels.upsample_size(level, [tuple(s) for s in sizes], session.forward_upsample_size)
            with torch.no_grad(), latent_shift.active(session.latent_shift_frames):
                sample = levels.up(level, sample, session.temb, session.encoder_hidden_states, session.extra,
                                   session.stashes.pop(level), size)
            session.compute_seconds += time.perf_counter() - started
        session.temb = None
        session.evaluations += 1
        return sample


def _first_in_features(levels: UNetLevels, path: str) -> int | None:
    """``in_features`` of the first loaded linear layer ending in ``path`` (e.g. ``time_emb_proj``)."""
    for name, module in levels.named_modules():
        if (name == path or name.endswith("." + path)) and isinstance(module, torch.nn.Linear):
            if not module.weight.is_meta:
                return module.in_features
    return None


def _cross_attention_width(levels: UNetLevels) -> int | None:
    """What our loaded cross-attention layers take as keys (temporal/motion self-attention does not count)."""
    for module in levels.modules():
        to_k = getattr(module, "to_k", None)
        if getattr(module, "is_cross_attention", False) and isinstance(to_k, torch.nn.Linear) \
                and not to_k.weight.is_meta:
            return to_k.in_features
    return None
