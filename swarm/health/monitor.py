"""The monitor: joins the DHT as a client and refreshes a ``SwarmState`` periodically.

Models come from the DHT's model index (nothing is hard-coded); servers from each model's block records; every
online server gets an ``info`` call, whose round trip is its RTT and whose failure marks it unreachable. Claims are
checked against behaviour: each reachable transformer server also gets a one-position forward pass through its
span, whose time (less the RTT) is its measured decode speed; a server far slower than it announces, or one that
answers ``info`` but never computes (a black hole), is flagged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from swarm.compression import serialize_tensor
from swarm.dht.node import start_dht, stop_dht
from swarm.dht.records import fetch_block_infos, fetch_models, merge_records
from swarm.dht.schema import ServerState
from swarm.health.history import History
from swarm.health.state import SwarmState, model_status
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, call
from swarm.trust.weights import ReferenceWeights

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # s: a server slower than this to answer counts as unreachable
COMPUTE_PROBE_TIMEOUT = 5.0  # s: a one-position forward not answered in this time counts as "no answer"


async def probe_info(p2p: P2P, peer: str) -> tuple[float, dict] | None:
    """``peer``'s info reply and its round trip in seconds; None if it did not answer."""
    started = time.perf_counter()
    try:
        info = await call(p2p, peer, protocol.INFO, {}, timeout=PROBE_TIMEOUT)
    except Exception:
        return None
    return time.perf_counter() - started, info


async def probe_compute(p2p: P2P, peer: str, start: int, end: int, rtt: float, info: dict) -> float | None | str:
    """Decode steps/s that ``peer`` measures at on a one-position forward through blocks [start, end) (its time
    less ``rtt``); "no answer" if it takes the request and never answers; None if it cannot be probed (not a
    transformer span by its ``info``, or it refuses forward passes, e.g. to unpaid callers)."""
    hidden = info.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 0 < hidden <= 2**16:
        return None
    message = {"start": start, "end": end, "hidden": serialize_tensor(torch.zeros(1, 1, hidden)),
               "position_ids": serialize_tensor(torch.zeros(1, 1, dtype=torch.long))}
    started = time.perf_counter()
    try:
        await call(p2p, peer, protocol.FORWARD, message, timeout=COMPUTE_PROBE_TIMEOUT)
    except RemoteError:
        return None
    except Exception:
        return "no answer"
    return 1.0 / max(time.perf_counter() - started - rtt, 1e-4)


class Monitor:
    def __init__(self, initial_peers: list[str], history: History, refresh_period: float = 30.0,
                 host: str = "127.0.0.1", references: dict[str, ReferenceWeights] | None = None):
        self.initial_peers, self.history, self.refresh_period, self.host = initial_peers, history, refresh_period, host
        self.references = references or {}  # model id -> its published weights (--reference-weights)
        self.state = SwarmState(updated_at=0.0)
        self.p2p: P2P | None = None
        self.node: DHTNode | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.p2p, self.node = await start_dht(self.initial_peers, host=self.host, client_mode=True)
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.node is not None:
            await stop_dht(self.p2p, self.node)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_period)
            try:
                await self.refresh()
            except Exception:
                logger.exception("Refresh failed; keeping the previous state")

    async def refresh(self) -> SwarmState:
        models = await fetch_models(self.node)
        per_model = {}
        for model_id, info in sorted(models.items()):
            per_model[model_id] = merge_records(await fetch_block_infos(self.node, model_id,
                                                                        list(range(info.num_blocks))))
        online = {peer for servers in per_model.values() for peer, record in servers.items()
                  if record.state == ServerState.ONLINE}
        answers = dict(zip(sorted(online), await asyncio.gather(*(probe_info(self.p2p, peer)
                                                                   for peer in sorted(online))), strict=True))
        probes = {peer: None if answer is None else answer[0] for peer, answer in answers.items()}
        rtts = list(probes.values())
        spans = {peer: (record.start, record.end) for servers in per_model.values()
                 for peer, record in servers.items() if peer in online}
        reachable = [peer for peer in sorted(online) if answers[peer] is not None]
        speeds = await asyncio.gather(*(probe_compute(self.p2p, peer, *spans[peer], *answers[peer])
                                        for peer in reachable))
        measured = dict(zip(reachable, speeds, strict=True))
        state = SwarmState(updated_at=time.time(), rtts_ms=[r * 1000 for r in rtts if r is not None])
        settlement = {peer: answer[1].get("settlement") for peer, answer in answers.items() if answer is not None}
        state.models = [model_status(model_id, models[model_id], servers, probes, measured, settlement,
                                     self.references.get(model_id))
                        for model_id, servers in per_model.items()]
        self.state = state
        self.history.record(state)
        return state
