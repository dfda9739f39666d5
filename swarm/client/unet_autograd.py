"""Autograd through a ``RemoteUNet``'s served levels: a U-Net call that needs gradients returns an output that
autograd differentiates, so that a client trains what it holds (a LoRA or textual inversion in the U-Net's head,
a conditioning encoder, the text encoder's embeddings) while the servers' weights stay frozen.

The forward is an ordinary evaluation on the session's chain whose requests are recorded (each hop's encoded down
and up inputs). The backward resends them with the gradients (swarm/blocks/unet_backward.py, where the servers
recompute their levels): ``up_backward`` on every server below the mid block, bottom up, then ``down_backward`` on
every server, top down. It returns the gradients w.r.t. the sample entering the first down block, the time
embedding and the encoder hidden states (summed over every step); autograd carries them on through the head.

Since servers keep nothing for a backward, several evaluations may run before one backward (a loss over several
U-Net calls), and a backward whose session was closed meanwhile (a new prompt, the idle closer) or whose server
failed runs the evaluation again on a new chain first. Gradients travel uncompressed: a float16 or 8-bit code
would lose small gradients, which a diffusion loss has many of.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from swarm.blocks.unet import HeadOutput
from swarm.client.chain import RETRYABLE, Attempts
from swarm.client.diffusion import DiffusionSession, HopRecord, LevelsHop
from swarm.compression import deserialize_tensor, is_serialized_tensor, serialize_tensor
from swarm.rpc.client import PeerUnavailable

if TYPE_CHECKING:
    from swarm.client.diffusion import RemoteUNet

GRAD_CODEC = "none"


def needs_grad(head: HeadOutput) -> bool:
    """Whether a U-Net call must be differentiable: grad mode is on and what enters the blocks depends on something
    that requires grad (the sample, the encoder hidden states, the head's parameters or inputs)."""
    return torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (head.sample, head.temb, head.encoder_hidden_states))


class TrainingSession(DiffusionSession):
    """A ``DiffusionSession`` whose evaluations are recorded for a backward, and that runs the backward."""

    recording = True

    async def _pass(self, sample: torch.Tensor, temb: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        if self.features or self.carry_skips:
            raise NotImplementedError("feature capture/injection and carried skips are not differentiable through "
                                      "the swarm")
        return await super()._pass(sample, temb, lora_scale)

    async def gradients(self, head: HeadOutput, record: list[HopRecord] | None, grad: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. ``head``'s sample, time embedding and encoder hidden states of an evaluation recorded
        as ``record``, given ``grad`` w.r.t. its output. Run again first where its hops are gone."""
        attempts = Attempts(self.manager)
        while True:
            if record is None or not self.hops or any(item.hop not in self.hops for item in record):
                await self._evaluate(head.sample, head.temb, head.lora_scale)  # (re)opens the chain where needed
                record = self.record
            try:
                return await self._backward(record, grad)
            except RETRYABLE as e:
                failed = next((item.hop for item in record if item.hop.span.peer_id == e.peer), None)
                if failed is None:
                    raise
                attempts.failed(e)  # raised if the request is at fault or out of retries
                await self.replace(failed, e)  # then the evaluation runs again on the new chain
                record = None

    async def _backward(self, record: list[HopRecord], grad: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        timeout, step_id = self.manager.config.request_timeout, next(self._step_ids)
        samples, last = grad.shape[0], len(record) - 1
        payload = serialize_tensor(grad, GRAD_CODEC)
        skip_parts: dict[int, torch.Tensor] = {}  # per hop, its down input's gradient through its skips
        sums: dict[str, torch.Tensor] = {}

        def add(reply: dict) -> None:
            for name in ("grad_temb", "grad_encoder_hidden_states"):
                if name in reply:
                    value = deserialize_tensor(reply[name])
                    sums[name] = value if name not in sums else sums[name] + value

        for index in range(last):  # the up passes ran top down: their gradients go bottom up
            item = record[index]
            reply = await _request(item.hop, {"type": "up_backward", "step_id": step_id, **_inputs(item.down),
                                              "up_sample": item.up["sample"], "grad_output": payload,
                                              "output_codec": GRAD_CODEC},
                                   ("grad_up_sample", "grad_sample", "grad_temb"), timeout, samples)
            payload = reply["grad_up_sample"]  # relayed untouched to the next server
            skip_parts[index] = deserialize_tensor(reply["grad_sample"])
            add(reply)
        grad_sample = None
        for index in reversed(range(last + 1)):  # then the down passes, top down
            item = record[index]
            reply = await _request(item.hop, {"type": "down_backward", "step_id": step_id, **_inputs(item.down),
                                              "grad_output": payload, "output_codec": GRAD_CODEC},
                                   ("grad_sample", "grad_temb"), timeout, samples)
            grad_sample = deserialize_tensor(reply["grad_sample"])
            if index in skip_parts:  # a down input feeds both the down output and the skips
                grad_sample = grad_sample + skip_parts[index]
            add(reply)
            if index:
                payload = serialize_tensor(grad_sample, GRAD_CODEC)
        return grad_sample, sums["grad_temb"], sums.get("grad_encoder_hidden_states")


def _inputs(down: dict) -> dict:
    return {key: down[key] for key in ("sample", "temb", "input_sizes", "lora_scale") if key in down}


async def _request(hop: LevelsHop, message: dict, fields: tuple[str, ...], timeout: float, samples: int) -> dict:
    """A backward step on ``hop``, billed like its passes; the reply must hold a tensor in each of ``fields``."""
    hop.with_receipt(message, hop.manager.config.receipt_interval)
    reply = await hop.stream.request(message, timeout=timeout)
    if not all(is_serialized_tensor(reply.get(field)) for field in fields):
        raise PeerUnavailable(f"server {hop.span} sent a backward reply without {', '.join(fields)}",
                              hop.span.peer_id)
    hop.take_receipt(reply, (message["step_id"], message["type"]), samples)
    hop.manager.succeeded(hop.span.peer_id)
    return reply


class _Evaluation:
    """One differentiable U-Net call: its head state (detached), and the session and record of its forward."""

    def __init__(self, unet: RemoteUNet, head: HeadOutput):
        self.unet, self.head = unet, head
        self.session: TrainingSession | None = None
        self.record: list[HopRecord] | None = None

    def forward(self) -> torch.Tensor:
        unet = self.unet
        with unet._session_lock:
            session = unet.session
            if not isinstance(session, TrainingSession) or not session.matches(self.head):
                unet._close_session()
                session = unet.session = TrainingSession(unet.manager, self.head, False, unet._block_processors(),
                                                         adapters=unet.lora_adapters)
            output = session.evaluate(self.head)
            self.session, self.record = session, session.record
            unet._last_used = time.monotonic()
        unet._watch_idle_session()
        return output

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not torch.isfinite(grad).all():
            raise ValueError("the gradient reaching the U-Net's output contains NaN or infinite values")
        unet, session = self.unet, self.session
        with unet._session_lock:
            try:
                grads = unet.manager.loop.run(session.gradients(self.head, self.record, grad.detach()))
            finally:
                if session is not unet.session:  # closed since the forward, and run again for this backward only
                    session.close()
            unet._last_used = time.monotonic()
        head = self.head
        return tuple(None if value is None else value.to(like.device, like.dtype)
                     for value, like in zip(grads, (head.sample, head.temb, head.encoder_hidden_states), strict=True))


class _ThroughServers(torch.autograd.Function):
    """The served levels as one differentiable operation: (sample, temb, encoder hidden states) -> up output."""

    @staticmethod
    def forward(ctx, evaluation: _Evaluation, sample: torch.Tensor, temb: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        ctx.evaluation = evaluation
        return evaluation.forward()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_sample, grad_temb, grad_ehs = ctx.evaluation.backward(grad)
        return None, grad_sample, grad_temb, grad_ehs


def evaluate_with_grad(unet: RemoteUNet, head: HeadOutput) -> torch.Tensor:
    """The served levels' output for ``head``, differentiable w.r.t. its sample, time embedding and encoder hidden
    states (what the head computed them from gets its gradients through them)."""
    if unet.feature_request is not None or unet.feature_bytes:
        raise NotImplementedError("feature capture and injection are not differentiable through the swarm: close "
                                  "the feature bank to train through the U-Net")
    ehs = head.encoder_hidden_states
    detached = dataclasses.replace(head, sample=head.sample.detach(), temb=head.temb.detach(),
                                   encoder_hidden_states=None if ehs is None else ehs.detach())
    return _ThroughServers.apply(_Evaluation(unet, detached), head.sample, head.temb, ehs)
