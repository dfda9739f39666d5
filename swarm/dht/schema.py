"""What servers announce in the DHT: one record per (block, server), plus an index of served models.

Records come from untrusted peers: readers take known fields with their types, ignore unknown ones (so old and
new versions coexist), and skip a record that is malformed instead of failing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

MODELS_KEY = "_swarm.models"  # subkey: model id, value: ModelInfo
MAX_ADAPTERS = 64  # adapter names read from one record
MAX_RELAY_ADDRS = 4


def block_key(model_id: str, block_index: int) -> str:
    return f"{model_id}.{block_index}"


class ServerState(enum.IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


@dataclass(frozen=True)
class ServerInfo:
    state: ServerState
    start: int  # first block of the server's span
    end: int  # one past its last block
    dtype: str = "float32"  # compute dtype of the blocks
    quantization: str = "none"  # weight quantization: none / int8 / nf4
    version: str = ""  # swarm software version
    public_name: str | None = None  # shown on the health page
    cache_tokens_left: int = 0  # free KV cache: batch x positions a new session may still reserve on this span
    max_session_length: int = 0  # the longest session (prompt + generation) the server accepts
    # Measured by the server on its own device, dtype and quantization (None: not measured).
    throughput: float | None = None  # tokens/s the server adds to each of its blocks, for swarm-wide balancing
    inference_rps: float | None = None  # decode steps/s over the whole span at batch 1, warm cache
    forward_tps: float | None = None  # tokens/s of a prefill-size forward over the whole span
    load: float = 0.0  # requests queued or running on the server's compute thread when announced
    next_pings: dict[str, float] = field(default_factory=dict)  # peer id -> RTT (s) to servers after this span
    # The server's own clock (time.time()) when this run of it started, and when it wrote this record: a client
    # compares them only with the same server's earlier values, to tell a restart or a live server from a dead one.
    started: float = 0.0
    announced: float = 0.0
    price: int = 0  # per token with settlement on (0: none); clients refuse receipts above it by default
    payment_required: bool = False  # sessions without settlement are refused
    adapters: tuple[str, ...] = ()  # LoRA adapters served beside the base weights (requests name one to use it)
    using_relay: bool = False  # behind NAT: reached through a relay (slower than a direct connection)
    relay_addrs: tuple[str, ...] = ()  # where to dial it then: the relay's port for it, ending in /p2p/<its id>
    weights: str = ""  # sha256 hex commitment to the exact weights served (swarm/trust/weights.py); "": unknown

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["state"] = int(self.state)
        data["adapters"] = list(self.adapters)
        data["relay_addrs"] = list(self.relay_addrs)
        return data

    @classmethod
    def from_dict(cls, data: object) -> ServerInfo | None:
        """The record if it is well-formed, else None. Unknown fields are ignored."""
        if not isinstance(data, dict):
            return None
        try:
            state = ServerState(data["state"])
            start, end = data["start"], data["end"]
            if not (_is_int(start) and _is_int(end) and 0 <= start < end):
                return None
            kwargs = {"state": state, "start": start, "end": end}
            for name, kind in (("dtype", str), ("quantization", str), ("version", str), ("public_name", str),
                               ("cache_tokens_left", int), ("max_session_length", int), ("price", int),
                               ("payment_required", bool), ("using_relay", bool)):
                value = data.get(name)
                if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) and (
                        kind is not int or value >= 0):
                    kwargs[name] = value
            for name in ("throughput", "inference_rps", "forward_tps", "load", "started", "announced"):
                value = data.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                        and value >= 0:
                    kwargs[name] = float(value)
            adapters = data.get("adapters")
            if isinstance(adapters, (list, tuple)):
                kwargs["adapters"] = tuple(a for a in adapters[:MAX_ADAPTERS] if isinstance(a, str))
            relay_addrs = data.get("relay_addrs")
            if isinstance(relay_addrs, (list, tuple)):
                kwargs["relay_addrs"] = tuple(a for a in relay_addrs[:MAX_RELAY_ADDRS]
                                              if isinstance(a, str) and len(a) <= 256)
            weights = data.get("weights")
            if isinstance(weights, str) and len(weights) == 64 and all(c in "0123456789abcdef" for c in weights):
                kwargs["weights"] = weights
            pings = data.get("next_pings")
            if isinstance(pings, dict):
                kwargs["next_pings"] = {k: float(v) for k, v in pings.items()
                                        if isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)}
            return cls(**kwargs)
        except (KeyError, ValueError, TypeError):
            return None


@dataclass(frozen=True)
class ModelInfo:
    num_blocks: int  # total decoder blocks of the model
    repository: str | None = None  # where to get it: a hub name
    model_type: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ModelInfo | None:
        if not isinstance(data, dict) or not _is_int(data.get("num_blocks")) or data["num_blocks"] <= 0:
            return None
        repository, model_type = data.get("repository"), data.get("model_type")
        return cls(data["num_blocks"], repository if isinstance(repository, str) else None,
                   model_type if isinstance(model_type, str) else None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
