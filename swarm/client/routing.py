"""Which servers a request goes through: the swarm's view from the DHT and a chain that covers the blocks.

For now a chain is built greedily (at each block, the online server whose span reaches furthest, ties broken at
random); latency- and throughput-aware routing replaces ``choose_chain`` later without changing its callers.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from swarm.blocks.quantization import meets_precision
from swarm.client.config import ClientConfig
from swarm.dht.node import start_dht, stop_dht
from swarm.dht.records import fetch_block_infos
from swarm.dht.schema import ServerInfo, ServerState
from swarm.utils.loop_thread import LoopThread


class MissingBlocksError(RuntimeError):
    """No online server holds a block the request needs."""


@dataclass(frozen=True)
class RemoteSpan:
    peer_id: str  # base58
    start: int  # blocks [start, end) of the model this hop runs
    end: int
    info: ServerInfo

    def __str__(self) -> str:
        return f"{self.peer_id[-8:]}[{self.start}:{self.end}]"


def choose_chain(block_infos: list[dict[str, ServerInfo]], start: int, end: int, excluded: set[str],
                 model_id: str, min_precision: str = "nf4") -> list[RemoteSpan]:
    chain, block = [], start
    while block < end:
        candidates = [(peer, info) for peer, info in block_infos[block].items()
                      if info.state == ServerState.ONLINE and info.start <= block < info.end and peer not in excluded
                      and meets_precision(info.quantization, min_precision)]
        if not candidates:
            detail = f" with precision >= {min_precision}" if min_precision != "nf4" else ""
            raise MissingBlocksError(f"no server holds block {block} of {model_id}{detail}")
        furthest = max(info.end for _, info in candidates)
        peer, info = random.choice([(p, i) for p, i in candidates if i.end == furthest])
        chain.append(RemoteSpan(peer, block, min(info.end, end), info))
        block = chain[-1].end
    return chain


class SequenceManager:
    """The client's connection to the swarm for one model: its libp2p daemon, DHT view and banned servers."""

    def __init__(self, config: ClientConfig, model_id: str, num_blocks: int):
        self.config, self.model_id, self.num_blocks = config, model_id, num_blocks
        self.loop = LoopThread()
        self.p2p, self.dht = self.loop.run(start_dht(config.initial_peers, host=config.host, client_mode=True))
        self.block_infos: list[dict[str, ServerInfo]] = [{} for _ in range(num_blocks)]
        self.last_update = -float("inf")
        self.banned_until: dict[str, float] = {}

    async def update(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_update > self.config.update_period:
            self.block_infos = await fetch_block_infos(self.dht, self.model_id, list(range(self.num_blocks)))
            self.last_update = time.monotonic()

    async def make_sequence(self, start: int = 0, end: int | None = None) -> list[RemoteSpan]:
        """A chain of servers covering blocks [start, end); raises ``MissingBlocksError`` if there is none."""
        end = self.num_blocks if end is None else end
        await self.update()
        now = time.monotonic()
        excluded = {peer for peer, until in self.banned_until.items() if until > now}
        excluded.update(self.config.blocked_servers)
        precision = self.config.min_precision
        try:
            return choose_chain(self.block_infos, start, end, excluded, self.model_id, precision)
        except MissingBlocksError:  # our view may be stale: look again before giving up
            await self.update(force=True)
            return choose_chain(self.block_infos, start, end, excluded, self.model_id, precision)

    def ban(self, peer_id: str) -> None:
        """Avoid a server that failed us, and refresh the view before the next chain."""
        self.banned_until[peer_id] = time.monotonic() + self.config.ban_time
        self.last_update = -float("inf")

    def shutdown(self) -> None:
        try:
            self.loop.run(stop_dht(self.p2p, self.dht), timeout=15)
        finally:
            self.loop.stop()
