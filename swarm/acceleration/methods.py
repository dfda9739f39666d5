"""The acceleration methods a client can choose per request, and how each is applied to a distributed model.

Every method is a set of switches that already exist in the swarm: the wire codec between servers and at the
chain's ends, the servers' weight quantization (through the routing policy, which then uses only servers quantized
so), keeping the first blocks on the client, chunked prefill, server-to-server pushes, and speculative decoding with
prompt-lookup drafts (offered for greedy single-sequence requests, where it cannot change the output). A method is
applied to one request by giving its settings (``configure``) to that request's inference session.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig


@dataclass(frozen=True)
class Method:
    name: str
    compression: str = "blockwise8"  # between servers
    edge_compression: str | None = None  # at the chain's ends (None: float16 under 8-bit, see ClientConfig)
    quantization: str = "none"  # the servers' weights: "none", "int8" or "nf4"
    local_blocks: int = 0  # first blocks computed by the client
    prefill_chunk: int | None = None  # prompt sent in chunks of this many positions
    push: bool = True  # servers hand outputs to the next server; False: the client relays every hop
    prompt_lookup: int = 0  # tokens drafted by prompt lookup and checked per step (greedy batch-1 requests only)

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
    Method("prompt-lookup", prompt_lookup=10),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown acceleration method {name!r}; known: {', '.join(METHODS)} (or 'auto')")
    return METHODS[name]


def configure(config: ClientConfig, method: Method) -> ClientConfig:
    """``config`` with ``method``'s switches: the settings of one request, given to its inference session
    (``model.inference_session(max_length, config=...)``). The model's own config is never changed, so threads
    generating through one model with different methods do not overwrite each other's settings."""
    return dataclasses.replace(config, compression=method.compression, edge_compression=method.edge_compression,
                               routing_policy=dataclasses.replace(config.routing_policy,
                                                                  quantization=method.quantization),
                               prefill_chunk=method.prefill_chunk, push=method.push, local_blocks=method.local_blocks,
                               prompt_lookup_tokens=method.prompt_lookup)
