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
from swarm.rpc import messages, protocol
from swarm.rpc.client import PeerUnavailable, call

Record = list[tuple[RemoteSpan, dict]]  # each hop and the encoded hidden states it received


def span_request(span: RemoteSpan, hidden: dict, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 output_codec: str, **extra: object) -> dict:
    """A forward/backward/step request for ``span``; ``hidden`` is an already encoded tensor."""
    return messages.span_inputs(span.start, span.end, hidden, position_ids, attention_mask, output_codec, **extra)


async def _call_span(manager: SequenceManager, span: RemoteSpan, handler: str, message: dict,
                     fields: tuple[str, ...]) -> dict:
    """``span``'s server's reply to ``message``, which must hold a tensor in each of ``fields``."""
    reply = await call(manager.p2p, span.peer_id, handler, message, timeout=manager.config.request_timeout)
    if not all(is_serialized_tensor(reply.get(field)) for field in fields):
        raise PeerUnavailable(f"server {span} sent a reply without {' and '.join(map(repr, fields))}", span.peer_id)
    manager.succeeded(span.peer_id)
    return reply


def span_prompts(span: RemoteSpan, prompts: torch.Tensor | None, first: int) -> torch.Tensor | None:
    """``span``'s part of deep ``prompts`` that cover blocks from ``first`` on (None: no prompts)."""
    return None if prompts is None else prompts[span.start - first:span.end - first]


async def forward_chain(manager: SequenceManager, hidden: dict, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, start: int | None = None, end: int | None = None,
                        chain: list[RemoteSpan] | None = None, prompts: torch.Tensor | None = None,
                        adapter: str | None = None) -> tuple[dict, Record]:
    """Run blocks [start, end) on encoded ``hidden`` (through ``chain`` if given, else the cheapest one);
    returns the encoded output and each hop with its input. ``prompts``: deep prompts for blocks [start, end),
    (blocks, 1 or batch, prompt length, hidden), sent exactly (they are small). ``adapter``: the LoRA adapter the
    servers apply (only servers holding it are chosen)."""
    start = manager.first_block if start is None else start
    end = manager.num_blocks if end is None else end
    request = RouteRequest(mode="throughput", tokens=position_ids.numel(), adapter=adapter)
    chain = chain or await manager.make_sequence(start, end, request)
    record: Record = []
    attempts, index = Attempts(manager), 0
    while index < len(chain):
        span = chain[index]
        codec = output_codec(manager.config, span.end == end)
        # a zero-knowledge proof of this hop, checked in the background (proofs.py)
        challenge = manager.proofs is not None and random.random() < manager.config.zk_probability
        try:
            reply = await _call_span(manager, span, protocol.FORWARD,
                                     span_request(span, hidden, position_ids, attention_mask, codec,
                                                  **messages.prompts_field(span_prompts(span, prompts, start)),
                                                  **messages.adapter_field(adapter),
                                                  **({"challenge": True} if challenge else {})), ("hidden",))
            output = reply["hidden"]
        except RETRYABLE as e:
            attempts.failed(e)  # raised if the request is at fault or out of retries
            with manager.rerouting_after(e, span.peer_id):
                manager.failed(span.peer_id, e)
                chain = chain[:index] + await manager.make_sequence(span.start, end, request)
            continue
        if random.random() < manager.config.verify_probability:
            verdict = await check_output(manager, span, deserialize_tensor(hidden), position_ids, attention_mask,
                                         deserialize_tensor(output), codec, adapter,
                                         span_prompts(span, prompts, start))
            if span.peer_id in verdict.struck:  # caught returning a wrong output: recompute this hop elsewhere
                attempts.failed(RuntimeError(f"redundant checks keep failing on blocks {span.start}:{span.end}"),
                                span.peer_id)
                chain = chain[:index] + await manager.make_sequence(span.start, end, request)
                continue
        if challenge:
            manager.proofs.track(span, reply, deserialize_tensor(hidden), deserialize_tensor(output))
        record.append((span, hidden))
        hidden, index = output, index + 1
    return hidden, record


async def backward_chain(manager: SequenceManager, record: Record, grad_output: dict,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         attempts: Attempts | None = None, prompts: torch.Tensor | None = None,
                         first: int = 0, adapter: str | None = None) -> tuple[dict, list[tuple[int, torch.Tensor]]]:
    """Encoded gradient w.r.t. the chain's input, hop by hop in reverse; a failed hop is recomputed elsewhere.
    With deep ``prompts`` (for blocks from ``first`` on), also each hop's gradient w.r.t. its prompts, as
    (first block, gradient) pieces."""
    attempts = attempts or Attempts(manager)
    grad, prompt_grads = grad_output, []
    for index in reversed(range(len(record))):
        span, inputs = record[index]
        codec = output_codec(manager.config, index == 0)
        try:
            reply = await _call_span(manager, span, protocol.BACKWARD,
                                     span_request(span, inputs, position_ids, attention_mask, codec, grad_output=grad,
                                                  **messages.prompts_field(span_prompts(span, prompts, first)),
                                                  **messages.adapter_field(adapter)),
                                     ("grad_input",) if prompts is None else ("grad_input", "grad_prompts"))
            grad = reply["grad_input"]
            if prompts is not None:
                prompt_grads.append((span.start, deserialize_tensor(reply["grad_prompts"])))
        except PeerUnavailable as e:
            attempts.failed(e, span.peer_id)  # raised when out of retries
            # The replacement must see exactly what the failed server saw: the decoded input, sent losslessly.
            exact_inputs = serialize_tensor(deserialize_tensor(inputs), "none")
            own = span_prompts(span, prompts, first)
            _, sub_record = await forward_chain(manager, exact_inputs, position_ids, attention_mask,
                                                span.start, span.end, prompts=own, adapter=adapter)
            grad, sub_grads = await backward_chain(manager, sub_record, grad, position_ids, attention_mask, attempts,
                                                   own, span.start, adapter)
            prompt_grads.extend(sub_grads)
    return grad, prompt_grads


class RemoteChainFunction(torch.autograd.Function):
    """Autograd through remote blocks: forward calls servers' forward, backward their backward.

    The batch is cut into row chunks of at most ``max_batch_tokens`` tokens, spread over parallel chains when the
    routing finds that splitting finishes sooner; chunks on different chains run concurrently.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                manager: SequenceManager, blocks: tuple[int, int] | None = None,
                prompts: torch.Tensor | None = None, adapter: str | None = None) -> torch.Tensor:
        """``prompts``: deep prompts of every block run, (blocks, 1 or batch, prompt length, hidden); ``adapter``:
        the LoRA adapter the servers apply, forward and backward."""
        config = manager.config
        batch, tokens = hidden.shape[:2]
        start, end = blocks if blocks is not None else (manager.first_block, manager.num_blocks)
        whole = (start, end) == (manager.first_block, manager.num_blocks)
        chains = [None]
        if batch > 1 and config.max_parallel_chains > 1 and whole:  # parallel chains cover every remote block
            request = RouteRequest(mode="throughput", tokens=batch * tokens, adapter=adapter)
            chains = manager.loop.run(manager.parallel_routes(request, config.max_parallel_chains))
        rows = max(1, min(config.max_batch_tokens // max(1, tokens), -(-batch // len(chains))))
        chunks = [slice(i, i + rows) for i in range(0, batch, rows)]
        mask_of = (lambda rows_: None) if attention_mask is None else (lambda rows_: attention_mask[rows_])
        per_row = prompts is not None and prompts.shape[1] > 1
        prompts_of = (lambda rows_: None) if prompts is None else (
            lambda rows_: prompts[:, rows_] if per_row else prompts)

        async def run_chain(chain, assigned: list[slice]) -> list[tuple[dict, Record]]:
            return [await forward_chain(manager, serialize_tensor(hidden[rows_].detach(), config.edge_codec),
                                        position_ids[rows_], mask_of(rows_), start, end, chain=chain,
                                        prompts=prompts_of(rows_), adapter=adapter)
                    for rows_ in assigned]

        async def run_all() -> list[list[tuple[dict, Record]]]:
            plan = [chunks[i :: len(chains)] for i in range(len(chains))]  # chunk i goes to chain i mod n
            return await asyncio.gather(*(run_chain(chain, assigned) for chain, assigned in zip(chains, plan,
                                                                                               strict=True)))

        results = manager.loop.run(run_all())
        done = {rows_.start: result for i, per_chain in enumerate(results)
                for rows_, result in zip(chunks[i :: len(chains)], per_chain, strict=True)}
        ctx.manager, ctx.position_ids, ctx.attention_mask, ctx.mask_of = manager, position_ids, attention_mask, mask_of
        ctx.prompts, ctx.prompts_of, ctx.per_row, ctx.start = prompts, prompts_of, per_row, start
        ctx.adapter = adapter
        ctx.chunks = [(rows_, done[rows_.start][1]) for rows_ in chunks]
        return torch.cat([deserialize_tensor(done[rows_.start][0]) for rows_ in chunks]).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        manager = ctx.manager

        async def run_all() -> list[tuple[dict, list]]:
            return await asyncio.gather(*(
                backward_chain(manager, record, serialize_tensor(grad_output[rows_].contiguous(),
                                                                 manager.config.edge_codec),
                               ctx.position_ids[rows_], ctx.mask_of(rows_), prompts=ctx.prompts_of(rows_),
                               first=ctx.start, adapter=ctx.adapter)
                for rows_, record in ctx.chunks))

        results = manager.loop.run(run_all())
        grad_input = torch.cat([deserialize_tensor(g) for g, _ in results]).to(grad_output.dtype)
        grad_prompts = None
        if ctx.prompts is not None and ctx.needs_input_grad[5]:
            grad_prompts = torch.zeros_like(ctx.prompts)
            for (rows_, _), (_, pieces) in zip(ctx.chunks, results, strict=True):
                for block, grad in pieces:  # each hop's blocks, for this chunk's rows (or all rows, summed)
                    where = slice(block - ctx.start, block - ctx.start + grad.shape[0])
                    if ctx.per_row:
                        grad_prompts[where, rows_] += grad.to(grad_prompts.dtype)
                    else:
                        grad_prompts[where] += grad.to(grad_prompts.dtype)
        return grad_input, None, None, None, None, grad_prompts, None
