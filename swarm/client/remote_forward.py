"""Forward and backward passes through a chain of servers, without a cache (training, scoring).

Hidden states are encoded once, by whoever produced them: the client encodes its input with the edge codec, each
server encodes its output with the codec the client asked for (the inter-server codec, or the edge codec for the
last one), and the client relays those payloads to the next server untouched (a lossy code must never be applied
to a tensor it already decoded).

A hop whose server is unreachable is re-routed to other servers (which may split its blocks differently). A hop
that its server refused (``RemoteError``) is tried once more elsewhere: if another server refuses it too, the
request is at fault and the error is raised.
"""

from __future__ import annotations

import asyncio
import random

import torch

from swarm.client.chain import RETRYABLE, Attempts, output_codec
from swarm.client.routing import RemoteSpan, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.client.verification import check_output
from swarm.compression import deserialize_tensor, is_serialized_tensor, serialize_tensor
from swarm.rpc import protocol
from swarm.rpc.client import PeerUnavailable, call

Record = list[tuple[RemoteSpan, dict]]  # each hop and the encoded hidden states it received


def span_request(span: RemoteSpan, hidden: dict, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 output_codec: str, **extra: object) -> dict:
    """A forward/backward/step request for ``span``; ``hidden`` is an already encoded tensor."""
    message = {"start": span.start, "end": span.end, "hidden": hidden, "output_codec": output_codec,
               "position_ids": serialize_tensor(position_ids.long()), **extra}
    if attention_mask is not None:
        message["attention_mask"] = serialize_tensor(attention_mask.to(torch.int8))
    return message


async def _call_span(manager: SequenceManager, span: RemoteSpan, handler: str, message: dict, field: str) -> dict:
    reply = await call(manager.p2p, span.peer_id, handler, message, timeout=manager.config.request_timeout)
    if not is_serialized_tensor(reply.get(field)):
        raise PeerUnavailable(f"server {span} sent a reply without {field!r}", span.peer_id)
    return reply[field]


async def forward_chain(manager: SequenceManager, hidden: dict, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, start: int | None = None, end: int | None = None,
                        chain: list[RemoteSpan] | None = None) -> tuple[dict, Record]:
    """Run blocks [start, end) on encoded ``hidden`` (through ``chain`` if given, else the cheapest one);
    returns the encoded output and each hop with its input."""
    start = manager.first_block if start is None else start
    end = manager.num_blocks if end is None else end
    request = RouteRequest(mode="throughput", tokens=position_ids.numel())
    chain = chain or await manager.make_sequence(start, end, request)
    record: Record = []
    attempts, index = Attempts(manager), 0
    while index < len(chain):
        span = chain[index]
        codec = output_codec(manager.config, span.end == end)
        try:
            output = await _call_span(manager, span, protocol.FORWARD,
                                      span_request(span, hidden, position_ids, attention_mask, codec), "hidden")
        except RETRYABLE as e:
            attempts.failed(e)  # raised if the request is at fault or out of retries
            with manager.rerouting_after(e, span.peer_id):
                manager.failed(span.peer_id, e)
                chain = chain[:index] + await manager.make_sequence(span.start, end, request)
            continue
        if random.random() < manager.config.verify_probability:
            verdict = await check_output(manager, span, deserialize_tensor(hidden), position_ids, attention_mask,
                                         deserialize_tensor(output), codec)
            if span.peer_id in verdict.struck:  # caught returning a wrong output: recompute this hop elsewhere
                attempts.failed(RuntimeError(f"redundant checks keep failing on blocks {span.start}:{span.end}"),
                                span.peer_id)
                chain = chain[:index] + await manager.make_sequence(span.start, end, request)
                continue
        record.append((span, hidden))
        hidden, index = output, index + 1
    return hidden, record


async def backward_chain(manager: SequenceManager, record: Record, grad_output: dict,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         attempts: Attempts | None = None) -> dict:
    """Encoded gradient w.r.t. the chain's input, hop by hop in reverse; a failed hop is recomputed elsewhere."""
    attempts = attempts or Attempts(manager)
    grad = grad_output
    for index in reversed(range(len(record))):
        span, inputs = record[index]
        codec = output_codec(manager.config, index == 0)
        try:
            grad = await _call_span(manager, span, protocol.BACKWARD,
                                    span_request(span, inputs, position_ids, attention_mask, codec,
                                                 grad_output=grad), "grad_input")
        except PeerUnavailable as e:
            attempts.failed(e, span.peer_id)  # raised when out of retries
            # The replacement must see exactly what the failed server saw: the decoded input, sent losslessly.
            exact_inputs = serialize_tensor(deserialize_tensor(inputs), "none")
            _, sub_record = await forward_chain(manager, exact_inputs, position_ids, attention_mask,
                                                span.start, span.end)
            grad = await backward_chain(manager, sub_record, grad, position_ids, attention_mask, attempts)
    return grad


class RemoteChainFunction(torch.autograd.Function):
    """Autograd through remote blocks: forward calls servers' forward, backward their backward.

    The batch is cut into row chunks of at most ``max_batch_tokens`` tokens, spread over parallel chains when the
    routing finds that splitting finishes sooner; chunks on different chains run concurrently.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                manager: SequenceManager, blocks: tuple[int, int] | None = None) -> torch.Tensor:
        config = manager.config
        batch, tokens = hidden.shape[:2]
        start, end = blocks if blocks is not None else (manager.first_block, manager.num_blocks)
        whole = (start, end) == (manager.first_block, manager.num_blocks)
        chains = [None]
        if batch > 1 and config.max_parallel_chains > 1 and whole:  # parallel chains cover every remote block
            request = RouteRequest(mode="throughput", tokens=batch * tokens)
            chains = manager.loop.run(manager.parallel_routes(request, config.max_parallel_chains))
        rows = max(1, min(config.max_batch_tokens // max(1, tokens), -(-batch // len(chains))))
        chunks = [slice(i, i + rows) for i in range(0, batch, rows)]
        mask_of = (lambda rows_: None) if attention_mask is None else (lambda rows_: attention_mask[rows_])

        async def run_chain(chain, assigned: list[slice]) -> list[tuple[dict, Record]]:
            return [await forward_chain(manager, serialize_tensor(hidden[rows_].detach(), config.edge_codec),
                                        position_ids[rows_], mask_of(rows_), start, end, chain=chain)
                    for rows_ in assigned]

        async def run_all() -> list[list[tuple[dict, Record]]]:
            plan = [chunks[i :: len(chains)] for i in range(len(chains))]  # chunk i goes to chain i mod n
            return await asyncio.gather(*(run_chain(chain, assigned) for chain, assigned in zip(chains, plan,
                                                                                               strict=True)))

        results = manager.loop.run(run_all())
        done = {rows_.start: result for i, per_chain in enumerate(results)
                for rows_, result in zip(chunks[i :: len(chains)], per_chain, strict=True)}
        ctx.manager, ctx.position_ids, ctx.attention_mask, ctx.mask_of = manager, position_ids, attention_mask, mask_of
        ctx.chunks = [(rows_, done[rows_.start][1]) for rows_ in chunks]
        return torch.cat([deserialize_tensor(done[rows_.start][0]) for rows_ in chunks]).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        manager = ctx.manager

        async def run_all() -> list[dict]:
            return await asyncio.gather(*(
                backward_chain(manager, record, serialize_tensor(grad_output[rows_].contiguous(),
                                                                 manager.config.edge_codec),
                               ctx.position_ids[rows_], ctx.mask_of(rows_))
                for rows_, record in ctx.chunks))

        grads = manager.loop.run(run_all())
        return torch.cat([deserialize_tensor(g) for g in grads]).to(grad_output.dtype), None, None, None, None
