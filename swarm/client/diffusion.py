"""A drop-in diffusers U-Net whose down, mid and up blocks run in the swarm; head and tail stay here.

Each evaluation goes down the chain of servers (each runs the down blocks of its levels and keeps their skips)
and back up (each runs its up blocks on those skips): only ``sample`` and the time embedding travel. What stays
fixed for a generation (encoder hidden states, extra block arguments) is sent once, when the session opens. A
server failing mid-evaluation is banned, its levels are routed elsewhere, and the evaluation is run again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from swarm.blocks.unet import HeadOutput, run_head, run_tail
from swarm.client.chain import RETRYABLE, Attempts, ChainHop, open_chain, output_codec
from swarm.client.config import ClientConfig
from swarm.client.routing import Hop, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import deserialize_tensor, is_serialized_tensor, serialize_tensor
from swarm.rpc import messages, protocol
from swarm.rpc.client import PeerUnavailable
from swarm.rpc.framing import encode_message

logger = logging.getLogger(__name__)


@dataclass
class HopTraffic:
    """Bytes one hop's messages took on the wire during one evaluation (for people, benchmarks and tests)."""

    peer_id: str
    levels: tuple[int, int]
    sent: int = 0
    received: int = 0


class LevelsHop(ChainHop):
    """One server's session of U-Net levels: its down and up passes, each billed as the samples it carried."""

    @classmethod
    async def open(cls, manager: SequenceManager, hop: Hop, head: HeadOutput, codec: str,
                   carry_skips: bool = False) -> LevelsHop:
        message = messages.open_levels(hop.span.start, hop.span.end, codec, head.encoder_hidden_states, head.extra,
                                       head.forward_upsample_size, head.latent_shift_frames,
                                       list(head.sample.shape), carry_skips, head.freeu)
        stream, reply = await cls.open_stream(manager, hop, protocol.DIFFUSION, message)
        return cls(manager, hop, stream, reply.get("session_id"), codec)

    async def request(self, message: dict, timeout: float, traffic: HopTraffic, samples: int) -> dict:
        self.with_receipt(message, self.manager.config.receipt_interval)
        traffic.sent += len(encode_message(message))
        reply = await self.stream.request(message, timeout=timeout)
        traffic.received += len(encode_message(reply))
        if not is_serialized_tensor(reply.get("sample")):
            raise PeerUnavailable(f"server {self.span} sent a reply without a sample", self.span.peer_id)
        # a down and an up pass share their step id: each is a request of its own for the server
        self.take_receipt(reply, (message["step_id"], message["type"]), samples)
        self.manager.succeeded(self.span.peer_id)
        return reply


class DiffusionSession:
    """One generation's sessions on a chain of servers covering every level."""

    def __init__(self, manager: SequenceManager, head: HeadOutput, carry_skips: bool = False):
        self.manager, self.head, self.hops = manager, head, []
        self.carry_skips = carry_skips  # benchmark only: skips cross the network as in a linear chain
        self.traffic: list[list[HopTraffic]] = []  # per evaluation, per hop
        self._step_ids = itertools.count()

    def matches(self, head: HeadOutput) -> bool:
        """Whether ``head`` belongs to the same generation (same fixed conditioning) as this session."""
        mine, other = self.head.encoder_hidden_states, head.encoder_hidden_states
        same_ehs = (mine is None and other is None) or (
            mine is not None and other is not None and mine.shape == other.shape and torch.equal(mine, other))
        return same_ehs and self.head.forward_upsample_size == head.forward_upsample_size and \
            self.head.latent_shift_frames == head.latent_shift_frames and self.head.freeu == head.freeu and \
            self.head.extra.keys() == head.extra.keys() and all(
                torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                for a, b in ((self.head.extra[k], head.extra[k]) for k in head.extra))

    def evaluate(self, head: HeadOutput) -> torch.Tensor:
        """The up path's output for this evaluation's head state (to be fed to the tail)."""
        return self.manager.loop.run(self._evaluate(head.sample, head.temb))

    async def _evaluate(self, sample: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        attempts = Attempts(self.manager)
        while True:
            if not self.hops:
                self.hops = await self._open_chain(0, self.manager.num_blocks)
            try:
                return await self._pass(sample, temb)
            except RETRYABLE as e:
                failed = next((hop for hop in self.hops if hop.span.peer_id == e.peer), None)
                if failed is None:
                    raise
                attempts.failed(e)  # raised if the request is at fault or out of retries
                # The failed server's skips are gone: route its levels elsewhere and run the evaluation again.
                logger.warning(f"Server {failed.span} failed ({e}); re-routing its levels")
                index = self.hops.index(failed)
                self.hops.pop(index).stream.close()
                with self.manager.rerouting_after(e, failed.span.peer_id):
                    self.manager.failed(failed.span.peer_id, e)
                    self.hops[index:index] = await self._open_chain(failed.span.start, failed.span.end)

    async def _pass(self, sample: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        config = self.manager.config
        timeout, step_id = config.request_timeout, next(self._step_ids)
        traffic = [HopTraffic(h.span.peer_id, (h.span.start, h.span.end)) for h in self.hops]
        payload, sizes, temb_payload = serialize_tensor(sample, config.edge_codec), [], serialize_tensor(temb)
        last, samples = len(self.hops) - 1, sample.shape[0]
        carried = {}
        for index, hop in enumerate(self.hops):  # down; the last server holds the mid level and goes back up
            reply = await hop.request({"type": "down", "step_id": step_id, "sample": payload, "temb": temb_payload,
                                       "input_sizes": sizes,
                                       "output_codec": output_codec(config, last == 0)},
                                      timeout, traffic[index], samples)
            payload, sizes = reply["sample"], reply["input_sizes"]
            if "skips" in reply:
                carried[index] = {"skips": reply["skips"], "temb": reply["temb"]}
        for index in reversed(range(last)):  # up, relaying each output untouched
            codec = output_codec(config, index == 0)
            payload = (await self.hops[index].request({"type": "up", "step_id": step_id, "sample": payload,
                                                       "input_sizes": sizes, "output_codec": codec,
                                                       **carried.get(index, {})},
                                                      timeout, traffic[index], samples))["sample"]
        self.traffic.append(traffic)
        return deserialize_tensor(payload)

    async def _open_chain(self, start: int, end: int) -> list[LevelsHop]:
        async def open_hop(hop: Hop, previous: LevelsHop | None) -> LevelsHop:
            return await LevelsHop.open(self.manager, hop, self.head, self.manager.config.edge_codec,
                                        self.carry_skips)

        return await open_chain(self.manager, start, end, RouteRequest(mode="latency"), open_hop)

    def close(self) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(hop.close() for hop in self.hops))

        try:
            self.manager.loop.run(close_all(), timeout=10)
        except Exception:
            logger.debug("Failed to close a diffusion session cleanly", exc_info=True)
        self.hops = []


_NOT_REMOTE = ("{} would change what the U-Net's blocks compute, and those run on the swarm's servers: not "
               "supported through the swarm (refused rather than silently ignored)")


class RemoteUNet(ModelMixin):
    """Stands in for a pipeline's ``unet``: same call, same ``config``; blocks computed by the swarm. A
    ``ModelMixin``, because pipelines check their components' base class when given one."""

    def __init__(self, local: nn.Module, client_config: ClientConfig, model_id: str):
        super().__init__()
        self.local = local  # head and tail loaded; blocks are weightless stand-ins
        self.manager = SequenceManager(client_config, model_id, local.swarm_num_levels)
        self.session: DiffusionSession | None = None
        self.carry_skips = False  # benchmarks only: make skips cross the network, as a linear chain would
        self.freeu: dict | None = None  # FreeU factors the servers apply in this client's sessions (enable_freeu)
        self._session_lock = threading.Lock()  # an evaluation against the idle closer
        self._last_used = 0.0
        self._closer: threading.Thread | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.local, name)  # config, dtype, add_embedding, ... as pipelines expect

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, latent_shift_frames: int | None = None, **kwargs):
        """As the U-Net's forward; ``latent_shift_frames``: frames folded in the batch to apply Latent-Shift along
        (see ``swarm.blocks.latent_shift.LatentShiftUNet``)."""
        head = run_head(self.local, sample, timestep, encoder_hidden_states, **kwargs)
        head.latent_shift_frames, head.freeu = latent_shift_frames, self.freeu
        with self._session_lock:
            if self.session is None or not self.session.matches(head):
                self._close_session()
                self.session = DiffusionSession(self.manager, head, self.carry_skips)
            evaluated = self.session.evaluate(head)
            self._last_used = time.monotonic()
        self._watch_idle_session()
        output = run_tail(self.local, evaluated, head)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    def _watch_idle_session(self) -> None:
        idle = self.manager.config.diffusion_idle_close
        if idle is None or (self._closer is not None and self._closer.is_alive()):
            return

        def close_when_idle() -> None:
            while True:
                time.sleep(idle / 4)
                with self._session_lock:
                    if self.session is None:
                        return  # closed by its pipeline or by a new generation's start
                    if time.monotonic() - self._last_used >= idle:
                        logger.info(f"Closing a U-Net session idle for {idle:.0f} s")
                        self._close_session()
                        return

        self._closer = threading.Thread(target=close_when_idle, name="unet-idle-close", daemon=True)
        self._closer.start()

    # What changes the blocks' computation runs on the servers, so setting it here would be a silent no-op: refused.
    # (Memory settings such as attention slicing change no result and stay accepted.)
    @property
    def attn_processors(self) -> dict:
        raise NotImplementedError(_NOT_REMOTE.format("attention processors"))

    def set_attn_processor(self, *args, **kwargs) -> None:
        raise NotImplementedError(_NOT_REMOTE.format("attention processors"))

    def set_default_attn_processor(self) -> None:
        raise NotImplementedError(_NOT_REMOTE.format("attention processors"))

    def fuse_qkv_projections(self) -> None:
        raise NotImplementedError(_NOT_REMOTE.format("fused QKV projections"))

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """As diffusers' ``enable_freeu``: the servers apply these factors in the up blocks of this client's
        sessions (sent when a session opens; the next evaluation opens a new one)."""
        self.freeu = {"s1": float(s1), "s2": float(s2), "b1": float(b1), "b2": float(b2)}

    def disable_freeu(self) -> None:
        self.freeu = None

    def close_session(self) -> None:
        with self._session_lock:
            self._close_session()

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def shutdown(self) -> None:
        self.close_session()
        self.manager.shutdown()
