"""Names of the swarm's RPCs and the typed reading of request fields.

Every RPC is a libp2p stream carrying length-prefixed msgpack maps (framing.py). forward, backward and info send
one request and get one response; inference is a stream: an ``open`` message, then one message per step, each
answered in turn. A reply with an ``error`` field is an error for that request only.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
INFO = f"swarm.v{PROTOCOL_VERSION}.info"
FORWARD = f"swarm.v{PROTOCOL_VERSION}.forward"
BACKWARD = f"swarm.v{PROTOCOL_VERSION}.backward"
INFERENCE = f"swarm.v{PROTOCOL_VERSION}.inference"
PUSH = f"swarm.v{PROTOCOL_VERSION}.push"  # a server hands its step output to the next server of a session
DIFFUSION = f"swarm.v{PROTOCOL_VERSION}.diffusion"  # U-Net levels: a session per generation, down/up passes
PROOF = f"swarm.v{PROTOCOL_VERSION}.proof"  # fetch the zero-knowledge proof of a challenged forward (--zk)
SESSION_RPCS = {"span": INFERENCE, "levels": DIFFUSION}  # the session RPC of each kind of blocks
# s a server waits for the next one to take a pushed step (only queue it: ms when it is alive); after that its
# client relays it. Short, because it delays the client's failover when the next server froze.
PUSH_TIMEOUT = 2.0

_MISSING = object()


class RequestError(ValueError):
    """The caller's request is invalid; the message goes back to the caller verbatim."""


def get_field(message: dict, name: str, kind: type | tuple[type, ...], default: object = _MISSING) -> object:
    """``message[name]`` checked against ``kind`` (bools are not ints); ``default`` if absent and given."""
    if name not in message or message[name] is None:
        if default is _MISSING:
            raise RequestError(f"missing field {name!r}")
        return default
    value = message[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(f"field {name!r} must be {_names(kinds)}, got bool")
    if not isinstance(value, kinds):
        raise RequestError(f"field {name!r} must be {_names(kinds)}, got {type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)
