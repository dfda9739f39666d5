"""Addresses of peers that libp2p's own peer routing cannot find: servers behind NAT, reached through a relay.

Such a server announces its relayed multiaddr in its (signed) DHT record; whoever reads the record notes it here
(``remember``), and the RPC layer connects to it before opening a stream to that peer (``lookup``). Only addresses
ending in the peer's own id are kept: a record can speak for its signer only.
"""

from __future__ import annotations

import threading

MAX_ADDRESSES = 4  # per peer
MAX_PEERS = 4096  # the oldest are forgotten first

_lock = threading.Lock()
_known: dict[str, tuple[str, ...]] = {}


def remember(peer: str, addresses: tuple[str, ...] | list[str]) -> None:
    valid = tuple(a for a in addresses if isinstance(a, str) and a.endswith(f"/p2p/{peer}"))[:MAX_ADDRESSES]
    with _lock:
        if not valid:
            _known.pop(peer, None)
            return
        _known.pop(peer, None)
        _known[peer] = valid
        while len(_known) > MAX_PEERS:
            del _known[next(iter(_known))]


def lookup(peer: str) -> tuple[str, ...]:
    with _lock:
        return _known.get(peer, ())
