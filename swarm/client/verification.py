"""Redundant execution: a server's output for a span is recomputed by another server holding that span.

The second server gets the exact input the first one was sent (its whole history, uncompressed, through a plain
forward) and the outputs are compared within a tolerance calibrated for what the first output went through: the
codec it was sent with, and the servers' compute dtype. If they disagree, a third opinion decides: another server
when there is one, else the client itself computing the span (``LocalArbiter``, for spans of at most
``arbitration_blocks`` blocks, loaded from the model's checkpoint on demand). Whoever disagrees with the majority
gets a strike. One server's word against another's strikes nobody: a liar checking an honest server must not be
able to frame it. Only servers with the same dtype and weight quantization are compared (quantized weights
legitimately change outputs).

The checked output arrived through a codec (8-bit between servers, float16 at the chain's ends); the other opinions
are sent through the same codec before comparing, so what is compared is two encodings of nearly equal tensors,
whose spread is the honest float spread, not the codec's error: a server adding noise well below the 8-bit codec's
own error is still seen. Measured honest spread over 1,000+ checks of decode steps (relative L2 error,
`tests/test_trust.py`, tiny Llama, float32): below 6e-6 without a codec; with the default codecs median 0, 99th
percentile ~3e-4, largest 5.8e-3 (one 8-bit code flipped in a 64-wide hidden state). The tolerances are several
times those; a server adding 5% noise (which the 8-bit codec's own ~1e-2 error used to hide) is caught every time
it is checked.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import torch

from swarm.blocks.span import BlockSpan
from swarm.client.routing import RemoteSpan
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.dht.schema import ServerState
from swarm.rpc import messages, protocol
from swarm.rpc.client import PeerUnavailable, RemoteError, call

# Relative L2 error allowed between the checked output, as it travelled (through its codec), and an honest
# recomputation sent through the same codec: two nearly equal tensors encode to nearly the same codes, so this is
# the honest float spread (plus a rare code flip), not the codec's own error (~1e-2 for 8-bit).
CODEC_TOLERANCE = {"none": 1e-3, "float16": 2e-3, "bfloat16": 1e-2, "blockwise8": 2e-2}
DTYPE_TOLERANCE = {"float32": 0.0, "float16": 1e-2, "bfloat16": 5e-2}  # added for reduced-precision servers


def tolerance(codec: str, dtype: str) -> float:
    return CODEC_TOLERANCE.get(codec, 0.1) + DTYPE_TOLERANCE.get(dtype, 0.05)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def as_sent(output: torch.Tensor, codec: str) -> torch.Tensor:
    """``output`` as it would arrive through ``codec``: what an honest server's reply would have been."""
    if codec == "none":
        return output
    return deserialize_tensor(serialize_tensor(output.contiguous(), codec))


@dataclass
class Verdict:
    agreed: bool  # the checked output matched the majority (or the single other opinion)
    error: float  # relative error against the first other server's output
    checked_by: list[str] = field(default_factory=list)  # the other servers asked ("client": the client itself)
    struck: list[str] = field(default_factory=list)  # who got a strike
    majority_output: torch.Tensor | None = None  # when the checked output lost, the agreed one
    undecided: bool = False  # one server against another and no third opinion: nobody struck, output kept

    @property
    def skipped(self) -> bool:
        return not self.checked_by


class LocalArbiter:
    """The client's own opinion on a span: its blocks loaded from the model's checkpoint (once per span and
    dtype) and run on the exact input the servers got. Only for spans of at most ``max_blocks`` blocks."""

    def __init__(self, source: object, max_blocks: int):
        self.source, self.max_blocks = source, max_blocks
        self.spans: dict[tuple[int, int, str], object] = {}

    def can_judge(self, span: RemoteSpan) -> bool:
        return 0 < span.end - span.start <= self.max_blocks

    async def __call__(self, span: RemoteSpan, inputs: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        dtype = getattr(torch, span.info.dtype, torch.float32)
        key = (span.start, span.end, span.info.dtype)

        def compute() -> torch.Tensor:  # off the network thread: it takes a forward pass
            if key not in self.spans:
                self.spans[key] = BlockSpan.from_pretrained(self.source, span.start, span.end, dtype=dtype)
            with torch.no_grad():
                return self.spans[key](inputs.to(dtype), position_ids, attention_mask, prompts=prompts)

        return await asyncio.to_thread(compute)


def other_holders(manager: SequenceManager, span: RemoteSpan, exclude: set[str],
                  adapter: str | None = None) -> list[str]:
    """Online servers holding ``span``'s blocks with the same dtype and quantization (and LoRA ``adapter``, if
    any), not excluded or banned."""
    info = span.info
    unwanted = manager.banned() | set(manager.config.routing_policy.blocked_servers)
    return [peer for peer, other in manager.servers.items()
            if peer not in exclude and peer not in unwanted and other.state == ServerState.ONLINE
            and other.start <= span.start and other.end >= span.end
            and (other.dtype, other.quantization) == (info.dtype, info.quantization)
            and (adapter is None or adapter in other.adapters)
            and manager.stats_for(peer).strikes < manager.config.routing_policy.max_strikes]


async def recompute(manager: SequenceManager, peer: str, span: RemoteSpan, inputs: torch.Tensor,
                    position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    adapter: str | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
    message = messages.span_inputs(span.start, span.end, serialize_tensor(inputs, "none"), position_ids,
                                   attention_mask, "none", **messages.adapter_field(adapter),
                                   **messages.prompts_field(prompts))
    reply = await call(manager.p2p, peer, protocol.FORWARD, message, timeout=manager.config.request_timeout)
    return deserialize_tensor(reply.get("hidden"))


async def check_output(manager: SequenceManager, span: RemoteSpan, inputs: torch.Tensor, position_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, output: torch.Tensor, codec: str,
                       adapter: str | None = None, prompts: torch.Tensor | None = None) -> Verdict:
    """Compare ``output`` (the last ``output.shape[1]`` positions of ``span`` on ``inputs``, as returned by
    ``span.peer_id`` through ``codec``, with LoRA ``adapter`` and deep ``prompts`` for its blocks) with other
    servers' recomputation, and strike who disagrees."""
    await manager.update()
    candidates = other_holders(manager, span, {span.peer_id}, adapter)
    if not candidates:
        return Verdict(agreed=True, error=0.0)
    random.shuffle(candidates)  # an honest check must not be predictable by the checked server
    tol = tolerance(codec, span.info.dtype)
    opinions: list[tuple[str, torch.Tensor]] = []
    for peer in candidates:
        try:
            full = await recompute(manager, peer, span, inputs, position_ids, attention_mask, adapter, prompts)
        except (PeerUnavailable, RemoteError):
            manager.ban(peer)
            continue
        opinions.append((peer, full[:, -output.shape[1]:]))
        if len(opinions) == 2 or (len(opinions) == 1 and relative_error(output, as_sent(full[:, -output.shape[1]:],
                                                                                          codec)) <= tol):
            break
    if not opinions:
        return Verdict(agreed=True, error=0.0)
    first_peer, first = opinions[0]
    error = relative_error(output, as_sent(first, codec))
    checked_by = [peer for peer, _ in opinions]
    if error <= tol:
        return Verdict(agreed=True, error=error, checked_by=checked_by)
    exact = CODEC_TOLERANCE["none"] + DTYPE_TOLERANCE.get(span.info.dtype, 0.05)  # two uncompressed outputs
    if len(opinions) == 1:  # one against one: only a third opinion may strike anybody
        arbiter = manager.arbiter  # (it computes the base weights: no opinion on an adapter's output)
        if arbiter is None or adapter is not None or not arbiter.can_judge(span):
            return Verdict(agreed=True, error=error, checked_by=checked_by, undecided=True)
        own = (await arbiter(span, inputs, position_ids, attention_mask, prompts))[:, -output.shape[1]:]
        checked_by.append("client")
        checked_right = relative_error(output, as_sent(own, codec)) <= tol
        checker_right = relative_error(first, own) <= exact
        struck = [peer for peer, right in ((span.peer_id, checked_right), (first_peer, checker_right)) if not right]
        agreed, majority = checked_right, None if checked_right else own
    else:
        second_peer, second = opinions[1]
        if relative_error(first, second) <= exact:
            struck, agreed, majority = [span.peer_id], False, first  # the two others agree: the checked one lied
        elif relative_error(output, as_sent(second, codec)) <= tol:
            struck, agreed, majority = [first_peer], True, None  # the first checker is the odd one out
        else:
            struck, agreed, majority = [span.peer_id, first_peer, second_peer], False, None
    for peer in struck:
        manager.strike(peer)
    return Verdict(agreed=agreed, error=error, checked_by=checked_by, struck=struck, majority_output=majority)
