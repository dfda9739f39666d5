"""Forward and backward passes through a chain of servers, without a cache (training, scoring).

A hop whose server is unreachable is re-routed to other servers (which may split its blocks differently); a hop
that the server refused (``RemoteError``) is not retried, since another server would refuse it too.
"""

from __future__ import annotations

import torch

from swarm.client.routing import RemoteSpan, SequenceManager
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.client import PeerUnavailable, call

Record = list[tuple[RemoteSpan, torch.Tensor]]  # each hop and the hidden states it received


def span_request(span: RemoteSpan, hidden: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, **extra: object) -> dict:
    message = {"start": span.start, "end": span.end, "hidden": serialize_tensor(hidden),
               "position_ids": serialize_tensor(position_ids.long()), **extra}
    if attention_mask is not None:
        message["attention_mask"] = serialize_tensor(attention_mask.to(torch.int8))
    return message


async def _call_span(manager: SequenceManager, span: RemoteSpan, handler: str, message: dict, field: str):
    timeout = manager.config.request_timeout
    reply = await call(manager.p2p, span.peer_id, handler, message, timeout=timeout)
    return deserialize_tensor(reply.get(field))


async def forward_chain(manager: SequenceManager, hidden: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, start: int = 0,
                        end: int | None = None) -> tuple[torch.Tensor, Record]:
    """Run blocks [start, end) on ``hidden``; returns the output and each hop with its input (for backward)."""
    end = manager.num_blocks if end is None else end
    chain = await manager.make_sequence(start, end)
    record: Record = []
    failures, index = 0, 0
    while index < len(chain):
        span = chain[index]
        try:
            output = await _call_span(manager, span, protocol.FORWARD,
                                      span_request(span, hidden, position_ids, attention_mask), "hidden")
        except PeerUnavailable:
            failures += 1
            if failures > manager.config.max_retries:
                raise
            manager.ban(span.peer_id)
            chain = chain[:index] + await manager.make_sequence(span.start, end)
            continue
        record.append((span, hidden))
        hidden, index = output, index + 1
    return hidden, record


async def backward_chain(manager: SequenceManager, record: Record, grad_output: torch.Tensor,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         retries_left: int | None = None) -> torch.Tensor:
    """Gradient w.r.t. the chain's input, hop by hop in reverse; a failed hop is recomputed on other servers."""
    retries_left = manager.config.max_retries if retries_left is None else retries_left
    grad = grad_output
    for span, inputs in reversed(record):
        try:
            grad = await _call_span(manager, span, protocol.BACKWARD,
                                    span_request(span, inputs, position_ids, attention_mask,
                                                 grad_output=serialize_tensor(grad)), "grad_input")
        except PeerUnavailable:
            if retries_left <= 0:
                raise
            manager.ban(span.peer_id)
            _, sub_record = await forward_chain(manager, inputs, position_ids, attention_mask, span.start, span.end)
            grad = await backward_chain(manager, sub_record, grad, position_ids, attention_mask, retries_left - 1)
    return grad


class RemoteChainFunction(torch.autograd.Function):
    """Autograd through remote blocks: forward calls servers' forward, backward their backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                manager: SequenceManager) -> torch.Tensor:
        output, record = manager.loop.run(forward_chain(manager, hidden.detach(), position_ids, attention_mask))
        ctx.manager, ctx.record, ctx.position_ids, ctx.attention_mask = manager, record, position_ids, attention_mask
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        manager = ctx.manager
        grad = manager.loop.run(backward_chain(manager, ctx.record, grad_output.contiguous(), ctx.position_ids,
                                               ctx.attention_mask))
        return grad, None, None, None
