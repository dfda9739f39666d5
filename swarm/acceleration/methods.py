"""The acceleration methods a client can choose per request, and how each is applied to a distributed model.

Every method is a set of switches that already exist in the swarm: the wire codec between servers and at the
chain's ends, the servers' weight quantization (through the routing policy, which then uses only servers quantized
so), keeping the first blocks on the client, chunked prefill, and server-to-server pushes. Applying one changes the
client's settings for the duration of one request and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.client.model import DistributedPreTrainedModel


@dataclass(frozen=True)
class Method:
    name: str
    compression: str = "blockwise8"  # between servers
    edge_compression: str | None = None  # at the chain's ends (None: float16 under 8-bit, see ClientConfig)
    quantization: str = "none"  # the servers' weights: "none", "int8" or "nf4"
    local_blocks: int = 0  # first blocks computed by the client
    prefill_chunk: int | None = None  # prompt sent in chunks of this many positions
    push: bool = True  # servers hand outputs to the next server; False: the client relays every hop

    def describe(self) -> dict:
        return dataclasses.asdict(self)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("exact", compression="none", edge_compression="none"),
    Method("float16", compression="float16", edge_compression="float16"),
    Method("blockwise8"),  # the default: 8-bit between servers, float16 at the ends
    Method("blockwise8-ends", edge_compression="blockwise8"),  # 8-bit on every link
    Method("int8-weights", quantization="int8"),
    Method("nf4-weights", quantization="nf4"),
    Method("local-2", local_blocks=2),
    Method("chunked-prefill", prefill_chunk=32),
    Method("relay", push=False),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown acceleration method {name!r}; known: {', '.join(METHODS)} (or 'auto')")
    return METHODS[name]


@contextlib.contextmanager
def applied(model: DistributedPreTrainedModel, method: Method) -> Iterator[None]:
    """Run the body with ``method``'s switches set on ``model`` (its client settings and local blocks)."""
    remote = model.get_remote()
    config, manager = remote.client_config, remote.manager
    inner = model.model if hasattr(model, "model") else model  # the part holding the local span
    saved = (config.compression, config.edge_compression, config.routing_policy.quantization, config.prefill_chunk,
             config.push, manager.first_block, inner.local_span)
    try:
        config.compression, config.edge_compression = method.compression, method.edge_compression
        config.routing_policy.quantization = method.quantization
        config.prefill_chunk, config.push = method.prefill_chunk, method.push
        if method.local_blocks != manager.first_block:
            inner.local_span = model.local_span_of(method.local_blocks)
            manager.first_block = method.local_blocks
        yield
    finally:
        (config.compression, config.edge_compression, config.routing_policy.quantization, config.prefill_chunk,
         config.push, manager.first_block, inner.local_span) = saved
