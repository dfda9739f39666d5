"""Starting a libp2p daemon and a hivemind DHT node in the current event loop, on chosen interfaces."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from contextvars import ContextVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from swarm.dht.identity import Identity
from swarm.dht.p2pd import daemon_program
from swarm.dht.validation import SignedRecordValidator
from swarm.utils.multiaddrs import ip_and_port
from swarm.utils.ports import check_can_listen

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

_starting: ContextVar[list[P2P] | None] = ContextVar("swarm_p2p_starting", default=None)


class _TrackedP2P(P2P):
    """hivemind's P2P, made known to ``start_dht`` as soon as it exists. ``P2P.create`` cancelled while its daemon
    comes up (Ctrl-C or SIGTERM during a client's open) does not stop that daemon, and nothing refers to it any more;
    having no control connection yet, it would outlive its process by up to its idle timeout."""

    def __init__(self) -> None:
        super().__init__()
        if (started := _starting.get()) is not None:
            started.append(self)


def _own_group_for_p2pd() -> None:
    """Make hivemind start its p2pd daemon in a session (and so a process group) of its own, from the decompressed
    copy of its binary (swarm/dht/p2pd.py).

    In the caller's group, a terminal's Ctrl-C (SIGINT to the whole foreground group) could stop the daemon at once,
    racing the server's offline announcement through it, or leave an interactive client (the chat's "Ctrl-C stops
    an answer") without its connection to the swarm. Its parent still ends it; if the parent is killed, the daemon
    exits once its control connection is gone (tests/test_shutdown.py). Only p2pd spawns are changed; the wrapper
    is installed once.
    """
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_swarm_p2pd", False):
        return

    async def create_subprocess_exec(program, *args, **kwargs):
        if str(program).endswith("p2pd"):
            kwargs.setdefault("start_new_session", True)  # uvloop (uvicorn's loop) has no process_group
            program = await asyncio.to_thread(daemon_program, str(program))  # its decompressed copy (p2pd.py)
        return await original(program, *args, **kwargs)

    create_subprocess_exec._swarm_p2pd = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


def host_maddrs(host: str, port: int = 0) -> list[str]:
    """Listen multiaddrs for ``host`` (an IPv4/IPv6 address; 0.0.0.0 = every interface)."""
    if host == "localhost":
        host = "127.0.0.1"
    version = ipaddress.ip_address(host).version
    return [f"/ip{version}/{host}/tcp/{port}"]


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or ipaddress.ip_address(host).is_loopback


WILDCARD_HOSTS = ("0.0.0.0", "::")  # listening on every interface


def tcp_port(maddrs: Sequence[str]) -> int:
    """The TCP port of the first multiaddr that has one (what a daemon listens on)."""
    for maddr in maddrs:
        if (found := ip_and_port(maddr)) is not None:
            return found[1]
    raise ValueError(f"no TCP port in {list(maddrs)}")


def public_host(host: str, maddrs: Sequence[str]) -> str | None:
    """The address others reach us at: ``host`` if we listen on one address, else the first non-loopback IPv4 of
    our multiaddrs."""
    if host not in WILDCARD_HOSTS:
        return host
    for maddr in maddrs:
        found = ip_and_port(maddr)
        if found is not None and maddr.startswith("/ip4/") and not is_loopback(found[0]):
            return found[0]
    return None


def local_host(host: str) -> str:
    """Where this machine dials a daemon listening on ``host``."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


async def start_dht(initial_peers: Sequence[str] = (), *, host: str = "0.0.0.0", port: int = 0,
                    announce_maddrs: Sequence[str] | None = None, client_mode: bool = False,
                    identity: Identity | None = None) -> tuple[P2P, DHTNode]:
    """A P2P daemon listening on ``host:port`` and a DHT node on top of it (bootstrapped from ``initial_peers``).

    With an ``identity``, the daemon runs with that key and the node signs its records with it; every node
    verifies records (swarm/dht/validation.py). On a loopback host, NAT port mapping and AutoNAT are off: nothing is
    sent beyond 127.0.0.1.
    """
    loopback = is_loopback(host)
    check_can_listen(host, port)
    _own_group_for_p2pd()
    started: list[P2P] = []
    token = _starting.set(started)
    try:
        with identity.key_file() if identity else nullcontext(None) as key_path:
            p2p = await _TrackedP2P.create(
                initial_peers=list(initial_peers) or None,
                host_maddrs=host_maddrs(host, port),
                announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
                identity_path=str(key_path) if key_path else None,
                # hivemind checks that a key is not in use by starting a second daemon: slow, pointless for new keys
                check_if_identity_free=identity is not None and not identity.created,
                nat_port_map=not loopback,
                auto_nat=not loopback,
                use_relay=not loopback,
                dht_mode="client" if client_mode else "server",
            )
    except BaseException:
        for instance in started:  # the daemon (and hivemind's identity check's own) ends with the failed start
            with suppress(Exception):
                instance._terminate()
            with suppress(Exception):  # killed (it never served anyone) and its pipes closed now, not at exit
                instance._child._transport.close()
        raise
    finally:
        _starting.reset(token)
    try:
        node = await DHTNode.create(p2p=p2p, initial_peers=list(initial_peers) or None, client_mode=client_mode,
                                    cache_locally=False, num_workers=8,
                                    record_validator=SignedRecordValidator(identity))
    except BaseException:
        await p2p.shutdown()
        raise
    return p2p, node


async def visible_maddrs(p2p: P2P) -> list[str]:
    """Full multiaddrs (with /p2p/<peer id>) others can join with."""
    maddrs = [str(maddr) for maddr in await p2p.get_visible_maddrs()]
    return [maddr if "/p2p/" in maddr else f"{maddr}/p2p/{p2p.peer_id}" for maddr in maddrs]


async def stop_dht(p2p: P2P, node: DHTNode, timeout: float = 5.0) -> None:
    """Shut both down without hanging: if the daemon already died (e.g. Ctrl-C reached its process group too),
    hivemind's shutdown calls would wait on it forever."""
    with suppress(Exception):
        await asyncio.wait_for(node.shutdown(), timeout)
    with suppress(Exception):
        await asyncio.wait_for(p2p.shutdown(), timeout)
    p2p._terminate()  # idempotent: makes sure the p2pd child is gone
