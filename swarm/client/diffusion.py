"""A drop-in diffusers U-Net whose down, mid and up blocks run in the swarm; head and tail stay here.

Each evaluation goes down the chain of servers (each runs the down blocks of its levels and keeps their skips)
and back up (each runs its up blocks on those skips): only ``sample`` and the time embedding travel. What stays
fixed for a generation (encoder hidden states, extra block arguments) is sent once, when the session opens. A
server failing mid-evaluation is banned, its levels are routed elsewhere, and the evaluation is run again.

A call that needs gradients (to train what the client holds) is differentiable through the servers, whose weights
stay frozen: see unet_autograd.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from swarm.blocks import unet_adapters, unet_modifiers
from swarm.blocks.unet import BLOCK_PREFIXES, HeadOutput, run_head, run_tail
from swarm.client.chain import RETRYABLE, Attempts, ChainHop, open_chain, output_codec
from swarm.client.config import ClientConfig
from swarm.client.routing import Hop, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import deserialize_tensor, is_serialized_tensor, serialize_tensor
from swarm.rpc import messages, protocol
from swarm.rpc.client import PeerUnavailable, RemoteError
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
                   carry_skips: bool = False, processors: dict | None = None, feature_bytes: int = 0,
                   batch: int | None = None, adapters: tuple[tuple[str, float], ...] = ()) -> LevelsHop:
        shape = [max(batch or 0, head.sample.shape[0]), *head.sample.shape[1:]]  # batch: the most it will take
        message = messages.open_levels(hop.span.start, hop.span.end, codec, head.encoder_hidden_states, head.extra,
                                       head.forward_upsample_size, head.latent_shift_frames,
                                       shape, carry_skips, head.freeu, processors, feature_bytes, adapters)
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


@dataclass
class HopRecord:
    """What one hop was sent in an evaluation: its encoded inputs (a backward resends them)."""

    hop: LevelsHop
    down: dict  # the down request (sample, temb, input_sizes)
    up: dict | None = None  # the up request (None: the hop holds the mid block; its down pass went back up)


class DiffusionSession:
    """One generation's sessions on a chain of servers covering every level."""

    recording = False  # keep each evaluation's requests (``record``): a training session's backward resends them
    record: list[HopRecord] | None = None

    def __init__(self, manager: SequenceManager, head: HeadOutput, carry_skips: bool = False,
                 processors: dict | None = None, feature_bytes: unet_modifiers.Budget = 0,
                 batch: int | None = None, adapters: tuple[tuple[str, float], ...] = ()):
        self.manager, self.head, self.hops = manager, head, []
        self.batch = batch  # the largest sample batch the servers reserve for (None: this head's)
        self.reconditioned = False  # the next pass carries the head's conditioning to every hop
        self.carry_skips = carry_skips  # benchmark only: skips cross the network as in a linear chain
        self.processors = dict(processors or {})  # attention processor specs by layer name, for every hop
        self.adapters = tuple(adapters)  # LoRA adapters and weights every hop applies (set_adapters)
        self.feature_bytes = feature_bytes  # what each hop may keep of captured features (or per place)
        self.features: dict = {}  # this evaluation's feature captures/injections (a FeatureRequest's message)
        self.evaluations = 0
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

    def can_recondition(self, head: HeadOutput) -> bool:
        """Whether ``head`` differs from this session's only in conditioning the servers can take mid-session."""
        return self.head.forward_upsample_size == head.forward_upsample_size and \
            self.head.latent_shift_frames == head.latent_shift_frames and self.head.freeu == head.freeu and \
            head.sample.shape[0] <= max(self.batch or 0, self.head.sample.shape[0]) and \
            head.sample.shape[1:] == self.head.sample.shape[1:]

    def recondition(self, head: HeadOutput) -> None:
        self.head, self.reconditioned = head, True

    def evaluate(self, head: HeadOutput) -> torch.Tensor:
        """The up path's output for this evaluation's head state (to be fed to the tail)."""
        output = self.manager.loop.run(self._evaluate(head.sample, head.temb, head.lora_scale))
        self.evaluations += 1
        return output

    async def _evaluate(self, sample: torch.Tensor, temb: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        attempts = Attempts(self.manager)
        while True:
            if not self.hops:
                self.hops = await self._open_chain(0, self.manager.num_blocks)
            try:
                return await self._pass(sample, temb, lora_scale)
            except RETRYABLE as e:
                failed = next((hop for hop in self.hops if hop.span.peer_id == e.peer), None)
                if failed is None:
                    raise
                if self.feature_bytes and isinstance(e, RemoteError) and not e.busy:
                    raise  # a refusal of a session that keeps features: another server would not have them
                attempts.failed(e)  # raised if the request is at fault or out of retries
                # The failed server's skips are gone: route its levels elsewhere and run the evaluation again.
                await self.replace(failed, e)

    async def replace(self, failed: LevelsHop, error: Exception) -> None:
        """Route ``failed``'s levels to other servers, in its place in the chain."""
        logger.warning(f"Server {failed.span} failed ({error}); re-routing its levels")
        index = self.hops.index(failed)
        self.hops.pop(index).stream.close()
        try:
            with self.manager.rerouting_after(error, failed.span.peer_id):
                self.manager.failed(failed.span.peer_id, error)
                self.hops[index:index] = await self._open_chain(failed.span.start, failed.span.end)
        except BaseException:
            # no replacement: a chain with a gap must not be used by the next evaluation
            await asyncio.gather(*(hop.close() for hop in self.hops), return_exceptions=True)
            self.hops = []
            raise

    async def _pass(self, sample: torch.Tensor, temb: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        config = self.manager.config
        timeout, step_id = config.request_timeout, next(self._step_ids)
        traffic = [HopTraffic(h.span.peer_id, (h.span.start, h.span.end)) for h in self.hops]
        payload, sizes, temb_payload = serialize_tensor(sample, config.edge_codec), [], serialize_tensor(temb)
        last, samples = len(self.hops) - 1, sample.shape[0]
        carried = {}
        conditioning = messages.conditioning(self.head.encoder_hidden_states, self.head.extra,
                                             config.edge_codec) if self.reconditioned else {}
        scale = {"lora_scale": lora_scale} if lora_scale != 1.0 else {}  # cross_attention_kwargs', both passes
        record = []
        for index, hop in enumerate(self.hops):  # down; the last server holds the mid level and goes back up
            message = {"type": "down", "step_id": step_id, "sample": payload, "temb": temb_payload,
                       "input_sizes": sizes, "output_codec": output_codec(config, last == 0), **self._features(),
                       **conditioning, **scale}
            record.append(HopRecord(hop, message))
            reply = await hop.request(message, timeout, traffic[index], samples)
            payload, sizes = reply["sample"], reply["input_sizes"]
            if "skips" in reply:
                carried[index] = {"skips": reply["skips"], "temb": reply["temb"]}
        for index in reversed(range(last)):  # up, relaying each output untouched
            message = {"type": "up", "step_id": step_id, "sample": payload, "input_sizes": sizes,
                       "output_codec": output_codec(config, index == 0), **carried.get(index, {}),
                       **self._features()}
            record[index].up = message
            payload = (await self.hops[index].request(message, timeout, traffic[index], samples))["sample"]
        self.traffic.append(traffic)
        self.reconditioned = False
        if self.recording:
            self.record = record
        return deserialize_tensor(payload)

    def _features(self) -> dict:
        # every hop gets the whole request and acts on the places in its own levels
        return {"features": self.features} if self.features else {}

    async def _open_chain(self, start: int, end: int) -> list[LevelsHop]:
        async def open_hop(hop: Hop, previous: LevelsHop | None) -> LevelsHop:
            return await LevelsHop.open(self.manager, hop, self.head, self.manager.config.edge_codec,
                                        self.carry_skips, self.processors,
                                        unet_modifiers.budget_for(self.feature_bytes, hop.span.start, hop.span.end,
                                                                  self.manager.num_blocks), self.batch,
                                        self.adapters)

        request = RouteRequest(mode="latency", adapters=tuple(name for name, _ in self.adapters))
        return await open_chain(self.manager, start, end, request, open_hop)

    def close(self) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(hop.close() for hop in self.hops))

        try:
            self.manager.loop.run(close_all(), timeout=10)
        except Exception:
            logger.debug("Failed to close a diffusion session cleanly", exc_info=True)
        self.hops = []


# classes whose own forward applies cross_attention_kwargs' scale to their LoRA layers (diffusers' apply_lora_scale);
# the others hand it to their attention processors, which ignore it
LORA_SCALE_CLASSES = ("UNet2DConditionModel", "UNetMotionModel")
_SERVED_LORA = ("{} would change the U-Net's blocks, and those run on the swarm's servers. Servers serve LoRA "
                "adapters beside their blocks (python -m swarm.server MODEL --adapters NAME=PATH); load one with "
                "pipe.load_lora_weights(PATH, adapter_name=NAME) or choose served ones with "
                "pipe.set_adapters(NAME, weight), and scale a call with cross_attention_kwargs={{'scale': s}}")
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
        self.processors: dict[str, dict] = {}  # attention processor specs the servers apply (set_attn_processor)
        self.feature_bytes: unet_modifiers.Budget = 0  # what servers keep of captured features (feature_bank)
        self.feature_batch = 1  # the largest batch (videos) the feature bank's session takes
        self.feature_request: unet_modifiers.FeatureRequest | None = None  # this call's captures and injections
        self._adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters the servers apply (set_adapters)
        self._lora_enabled = True  # disable_lora/enable_lora
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
        scale = 1.0
        if kwargs.get("cross_attention_kwargs") is not None:  # its LoRA scale goes to the servers
            rest = dict(kwargs["cross_attention_kwargs"])
            scale = float(rest.pop("scale", 1.0))
            kwargs["cross_attention_kwargs"] = rest or None  # anything else is refused by run_head
            if type(self.local).__name__ not in LORA_SCALE_CLASSES:
                scale = 1.0  # as locally: this class's forward does not apply it
        head = run_head(self.local, sample, timestep, encoder_hidden_states, **kwargs)
        head.latent_shift_frames, head.freeu = latent_shift_frames, self.freeu
        head.lora_scale = scale if self.lora_adapters else 1.0
        if self._needs_grad(head):  # training what the client holds: gradients come back through the servers
            output = run_tail(self.local, self._evaluate_with_grad(head), head)
            return UNet2DConditionOutput(sample=output) if return_dict else (output,)
        with self._session_lock:
            if self.session is not None and self.feature_bytes and self.session.evaluations and \
                    not self.session.matches(head):
                # the servers keep the captured features in this session: give it the new conditioning
                if not self.session.can_recondition(head):
                    raise RuntimeError("while a feature bank is open, calls may change the prompt and image but not "
                                       "the sample's size, frames, FreeU or a batch beyond the bank's max_batch "
                                       "(the servers keep the features in this session)")
                self.session.recondition(head)
            elif self.session is None or not self.session.matches(head):
                self._close_session()
                batch = self.feature_batch * (head.num_frames or 1) if self.feature_bytes else None
                self.session = DiffusionSession(self.manager, head, self.carry_skips, self._block_processors(),
                                                self.feature_bytes, batch, self.lora_adapters)
            request = self.feature_request
            self.session.features = request.to_message() if request is not None else {}
            evaluated = self.session.evaluate(head)
            self._last_used = time.monotonic()
        self._watch_idle_session()
        output = run_tail(self.local, evaluated, head)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    @staticmethod
    def _needs_grad(head: HeadOutput) -> bool:
        from swarm.client.unet_autograd import needs_grad  # builds on this module

        return needs_grad(head)

    def _evaluate_with_grad(self, head: HeadOutput) -> torch.Tensor:
        from swarm.client.unet_autograd import evaluate_with_grad

        return evaluate_with_grad(self, head)

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

    # Attention processors run where their layers are: the blocks' on the servers (sent by name with each session's
    # opening: swarm/blocks/unet_modifiers.py), the head's here. Processors that are code, not a name, are refused.
    @property
    def attn_processors(self) -> dict:
        """As diffusers': every attention layer's processor (``<layer>.processor``), as the servers apply it."""
        return {f"{name}.processor": unet_modifiers.processor_from_spec(self.processors[name])
                if name in self.processors else AttnProcessor2_0() for name in self.local.swarm_attention_names}

    def set_attn_processor(self, processor: object) -> None:
        """As diffusers': one processor for every attention layer, or a map ``{"<layer>.processor": processor}``.
        Takes effect from the next evaluation (a new session with the servers)."""
        names = self.local.swarm_attention_names
        if isinstance(processor, dict):
            unknown = sorted(set(processor) - {f"{name}.processor" for name in names})
            if unknown:
                raise ValueError(f"no attention layer is named {unknown[0].removesuffix('.processor')!r}; "
                                 f"{len(unknown)} unknown of {len(processor)}")
            chosen = {key.removesuffix(".processor"): value for key, value in processor.items()}
        else:
            chosen = dict.fromkeys(names, processor)
        specs = {name: unet_modifiers.processor_spec(value) for name, value in chosen.items()}  # refuses code
        processors = {**self.processors, **specs}
        self.processors = {name: spec for name, spec in processors.items() if spec is not None}
        for name, value in chosen.items():  # the head's layers (a video U-Net's transformer_in) run here
            if not name.startswith(BLOCK_PREFIXES):
                self.local.get_submodule(name).set_processor(value)
        self.close_session()

    def set_default_attn_processor(self) -> None:
        self.set_attn_processor(AttnProcessor2_0())

    def _block_processors(self) -> dict:
        return {name: spec for name, spec in self.processors.items() if name.startswith(BLOCK_PREFIXES)}

    def feature_bank(self, max_bytes: unet_modifiers.Budget, max_batch: int = 2) -> RemoteFeatureBank:
        """Capture features in one evaluation and inject them in a later one (``bank.capture(tag, places)`` and
        ``bank.inject(tag, places)`` around U-Net calls), each server keeping what its levels captured, at most
        ``max_bytes`` each (or ``{place: bytes}``: each server reserves the sum over the places of its levels),
        until ``bank.close()`` closes the session. Meanwhile calls may change the prompt and
        image (sent to the servers mid-session), up to ``max_batch`` rows (2: classifier-free guidance)."""
        return RemoteFeatureBank(self, max_bytes, max_batch)

    # LoRA adapters run where their layers are: on the servers, which serve them beside the blocks
    # (swarm/blocks/unet_adapters.py). A session chooses them by name, as diffusers' set_adapters does locally.
    def served_adapters(self) -> list[str]:
        """The LoRA adapters the swarm's servers announce for this U-Net."""
        self.manager.loop.run(self.manager.update(force=True), timeout=30)
        return sorted({name for info in self.manager.servers.values() for name in info.adapters})

    @property
    def peft_config(self) -> dict[str, None]:
        """The served adapters by name (their configs stay on the servers): what ``pipe.set_adapters`` checks."""
        return dict.fromkeys(self.served_adapters())

    @property
    def lora_adapters(self) -> tuple[tuple[str, float], ...]:
        """The (adapter, weight) pairs this client's sessions run with (empty: the base model)."""
        return self._adapters if self._lora_enabled else ()

    def set_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        """As diffusers': run with these served adapters, each scaled by its weight (default 1). Takes effect from
        the next evaluation (a new session with the servers)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0 if w is None else w for w in (weights if isinstance(weights, list) else [weights] * len(names))]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        if any(isinstance(w, dict) for w in weights):
            raise NotImplementedError("block-wise LoRA weights are not supported through the swarm: give one "
                                      "number per adapter")
        served = self.served_adapters()
        missing = sorted(set(names) - set(served))
        if missing:
            raise ValueError(f"adapter(s) {missing} are not served for this U-Net in the swarm (served: {served})")
        self._choose_lora(tuple((name, float(w)) for name, w in zip(names, weights, strict=True)))

    def _choose_lora(self, adapters: tuple[tuple[str, float], ...], enabled: bool = True) -> None:
        """What the next evaluations run with (they open a new session: the servers take it at open)."""
        self._adapters, self._lora_enabled = adapters, enabled
        self.close_session()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.set_adapters(adapter_name)

    def active_adapters(self) -> list[str]:
        return [name for name, _ in self.lora_adapters]

    def disable_lora(self) -> None:
        self._choose_lora(self._adapters, enabled=False)

    def enable_lora(self) -> None:
        self._choose_lora(self._adapters)

    disable_adapters, enable_adapters = disable_lora, enable_lora

    def unload_lora(self) -> None:
        """Back to the base model (the servers keep serving the adapters to whoever chooses them)."""
        self._choose_lora((), enabled=self._lora_enabled)

    def load_lora_adapter(self, state_dict: object, prefix: str | None = "unet", hotswap: bool = False,
                          adapter_name: str | None = None, **kwargs: object) -> None:
        """What a pipeline's ``load_lora_weights(path, adapter_name=NAME)`` calls for the U-Net: the swarm's servers
        must serve this LoRA as NAME (``--adapters NAME=PATH``); it becomes this client's adapter, as a loaded one
        becomes the active one locally. The pipeline loads the LoRA's text-encoder part here, as locally."""
        if not isinstance(state_dict, dict):
            raise NotImplementedError(_SERVED_LORA.format("Loading a LoRA into the U-Net from a path"))
        mine = [key for key in state_dict if prefix is None or key.startswith(f"{prefix}.")]
        if not mine:
            return  # a LoRA of the text encoders alone
        outside = unet_adapters.head_or_tail_module(state_dict, prefix) if prefix else None
        if outside is not None:
            raise NotImplementedError(f"this LoRA {unet_adapters.HEAD_OR_TAIL.format(outside)}")
        if hotswap:
            raise NotImplementedError("hotswapping a LoRA is not supported through the swarm")
        served = self.served_adapters()
        if adapter_name not in served:
            raise NotImplementedError(
                _SERVED_LORA.format(f"Loading a LoRA's U-Net part as {adapter_name!r}") +
                f". Pass adapter_name= the name servers serve it as; served for this U-Net: {served or 'none'}")
        self._choose_lora(((adapter_name, 1.0),))

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Stop using these adapters (the servers keep serving them)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self._choose_lora(tuple((name, weight) for name, weight in self._adapters if name not in names),
                          enabled=self._lora_enabled)

    def add_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(_SERVED_LORA.format("A new adapter on the U-Net"))

    def fuse_lora(self, *args, **kwargs) -> None:
        raise NotImplementedError(_SERVED_LORA.format("Fusing a LoRA into the weights"))

    def save_pretrained(self, *args, **kwargs) -> None:
        raise NotImplementedError("the U-Net's blocks are on the swarm's servers, so a distributed pipeline cannot be "
                                  "saved as one diffusers loads: save the parts you changed (e.g. "
                                  "pipe.text_encoder.save_pretrained) beside the directory it was loaded from")

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


class RemoteFeatureBank(unet_modifiers.FeatureBank):
    """Features captured and injected on the servers of a ``RemoteUNet``'s session (see ``RemoteUNet.feature_bank``);
    the same calls as ``swarm.blocks.unet_modifiers.LocalFeatureBank``."""

    def __init__(self, unet: RemoteUNet, max_bytes: unet_modifiers.Budget, max_batch: int = 2):
        self.places = set(unet.local.swarm_feature_places)
        max_bytes = unet_modifiers.check_budget(max_bytes, self.places)
        if not isinstance(max_batch, int) or max_batch <= 0:
            raise ValueError("max_batch must be a positive integer")
        self.unet, self.max_bytes = unet, max_bytes
        unet.close_session()  # the next evaluation opens a session that reserves the bytes
        unet.feature_bytes, unet.feature_batch = max_bytes, max_batch

    @contextlib.contextmanager
    def _use(self, request: unet_modifiers.FeatureRequest) -> Iterator[None]:
        unet_modifiers.FeatureRequest.from_message(request.to_message(), self.places)  # clear errors here
        self.unet.feature_request = request
        try:
            yield
        finally:
            self.unet.feature_request = None

    def close(self) -> None:
        """Free what the servers keep (their session closes)."""
        self.unet.feature_bytes, self.unet.feature_batch = 0, 1
        self.unet.close_session()
