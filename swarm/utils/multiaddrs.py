"""Peer addresses as users type them: ``--initial-peers``, ``SWARM_INITIAL_PEERS`` and ``initial_peers=[...]``.

Checked up front, so a typo is one line naming the bad value instead of a libp2p daemon's traceback. Light on
purpose (no torch, no hivemind): every command line imports it before parsing its arguments.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from swarm.utils.errors import UserError

ENV_INITIAL_PEERS = "SWARM_INITIAL_PEERS"
EXAMPLE = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."


class BadMultiaddr(UserError, ValueError):
    """A peer address that does not parse, or lacks the peer id a libp2p daemon needs to dial it."""


class NoInitialPeers(UserError, ValueError):
    """A client was given no swarm to join."""


def peer_id_of(maddr: str) -> str:
    """The peer id at the end of a full multiaddr (``.../p2p/Qm...``)."""
    return maddr.rsplit("/p2p/", 1)[1]


def transport_of(maddr: str) -> str:
    """A multiaddr without its trailing ``/p2p/<peer id>``: where to dial, as a daemon's CONNECT takes it."""
    return maddr.rsplit("/p2p/", 1)[0]


def ip_and_port(maddr: str) -> tuple[str, int] | None:
    """``/ip4/H/tcp/P[/...]`` (or ip6) -> (H, P); None for other forms (dns, no TCP port)."""
    parts = maddr.split("/")
    if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
        return parts[2], int(parts[4])
    return None


def split_maddrs(text: str) -> list[str]:
    """Multiaddrs separated by whitespace and/or commas (the format of ``SWARM_INITIAL_PEERS``)."""
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


def looks_like_maddr(value: str) -> bool:
    """Whether ``value`` was meant as a multiaddr (``/ip4/...``, ``/dns/...``, ...) rather than, say, a model path:
    tells ``--initial-peers MADDR MODEL`` apart from a mistyped address."""
    from multiaddr.protocols import REGISTRY

    head = value.split("/")[1] if value.startswith("/") else ""
    try:
        REGISTRY.find(head)
        return True
    except Exception:  # the registry raises its own error types for unknown names
        return False


def check_maddr(value: str, *, what: str = "--initial-peers", need_peer_id: bool = True) -> str:
    """``value`` if it is a multiaddr (with a ``/p2p/<peer id>`` part if ``need_peer_id``), else ``BadMultiaddr``
    whose message names the value and says what a good one looks like."""
    from multiaddr import Multiaddr

    try:
        maddr = Multiaddr(value)
    except Exception as e:  # multiaddr raises several error types, all meaning "this does not parse"
        reason = str(e).split(" (string:", 1)[0]
        reason = reason.split(": ", 1)[1] if reason.startswith("Invalid MultiAddr") and ": " in reason else reason
        raise BadMultiaddr(f"{what}: {value!r} is not a valid multiaddr ({reason}); expected something like "
                           f"{EXAMPLE}") from None
    if need_peer_id and "p2p" not in [protocol.name for protocol in maddr.protocols()]:
        raise BadMultiaddr(f"{what}: {value!r} lacks the peer id: copy the whole address a node printed after "
                           f"'Join this swarm with', ending in /p2p/<peer id>")
    return value


def initial_peers(given: str | Iterable[str] | None, *, what: str = "initial_peers") -> list[str]:
    """The peers to join: ``given`` if it names any, else ``$SWARM_INITIAL_PEERS``; each one checked. A single
    string is split like the environment variable (a common slip: ``initial_peers="/ip4/..."``)."""
    if isinstance(given, str):
        given = split_maddrs(given)
    peers = [part for value in (given or ()) for part in split_maddrs(value)]
    if not peers and os.environ.get(ENV_INITIAL_PEERS, "").strip():
        peers, what = split_maddrs(os.environ[ENV_INITIAL_PEERS]), ENV_INITIAL_PEERS
    return [check_maddr(peer, what=what) for peer in peers]


def require_initial_peers(given: str | Iterable[str] | None, *, what: str = "initial_peers") -> list[str]:
    """Like ``initial_peers``, but none at all is a ``NoInitialPeers`` error that says how to name the swarm."""
    peers = initial_peers(given, what=what)
    if not peers:
        raise NoInitialPeers(f"no swarm to join: pass {what}=[MADDR, ...] (an address a server or "
                             f"`python -m swarm.dht` prints after 'Join this swarm with') or set "
                             f"{ENV_INITIAL_PEERS}")
    return peers
