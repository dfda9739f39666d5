"""The libp2p daemon, DHT node and event loop that the models of one client process share, one per swarm.

A p2pd costs about 0.25 CPU-s in its first second (building an address-range table, measured with perf; 0.35 when
it also decompresses itself, see swarm/dht/p2pd.py), and each keeps a connection of its own to every server. A
process that opens several models of one swarm (a pipeline and a language model, the API gateway, a notebook
re-running its cells, a test suite) uses one node for all of them instead: models share it while any of them is
open, and the last ``release`` stops it. Routing state, bans and sessions stay each model's own
(``SequenceManager``); servers see the process as one peer, and count its sessions and requests together, as they
would for one machine.

A model with an identity of its own (settlement: servers bill the key its receipts are signed with) gets a node of
its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarm.utils.loop_thread import LoopThread

STOP_TIMEOUT = 15.0  # s


@dataclass(eq=False)
class ClientNode:
    loop: LoopThread
    p2p: object  # hivemind.P2P
    dht: object  # hivemind DHTNode
    key: tuple | None  # None: not shared (a node with its own identity)
    users: int = 1
    pid: int = field(default_factory=os.getpid)

    @property
    def alive(self) -> bool:
        """Usable by another model: this process's (not a forked parent's), loop running, daemon up."""
        child = getattr(self.p2p, "_child", None)  # hivemind's daemon process (is_alive misses one that died)
        return (self.pid == os.getpid() and self.loop.thread.is_alive() and bool(self.p2p.is_alive)
                and (child is None or child.returncode is None))


_nodes: dict[tuple, ClientNode] = {}
_lock = threading.Lock()


def acquire(initial_peers: Sequence[str], host: str, identity=None) -> ClientNode:
    """A running node that joined the swarm of ``initial_peers``: the process's shared one for these peers and
    ``host``, started if there is none; with an ``identity``, a new node of its own."""
    from swarm.dht.node import start_dht

    key = None if identity is not None else (tuple(initial_peers), host)
    with _lock:  # one start per swarm even when two threads open models at once (others wait for it, ~1 s)
        node = _nodes.get(key) if key is not None else None
        if node is not None and node.alive:
            node.users += 1
            return node
        loop = LoopThread()
        try:
            p2p, dht = loop.run(start_dht(list(initial_peers), host=host, client_mode=True, identity=identity))
        except BaseException:
            loop.stop()
            raise
        node = ClientNode(loop, p2p, dht, key)
        if key is not None:
            _nodes[key] = node
        return node


def release(node: ClientNode) -> None:
    """One model fewer on ``node``; the last one stops its daemon and loop."""
    from swarm.dht.node import stop_dht

    with _lock:
        node.users -= 1
        if node.users > 0:
            return
        if node.key is not None and _nodes.get(node.key) is node:
            del _nodes[node.key]
    if not node.loop.thread.is_alive():
        return
    try:
        node.loop.run(stop_dht(node.p2p, node.dht), timeout=STOP_TIMEOUT)
    finally:
        node.loop.stop()
