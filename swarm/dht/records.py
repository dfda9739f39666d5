"""Writing and reading server announcements in a hivemind ``DHTNode``."""

from __future__ import annotations

from collections import Counter

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.dht.schema import MODELS_KEY, ModelInfo, ServerInfo, ServerState, block_key
from swarm.utils.peer_addresses import lookup, remember


async def announce_span(node: DHTNode, model_id: str, info: ServerInfo, model_info: ModelInfo | None,
                        expiration: float) -> bool:
    """Store ``info`` under every block key of the span (subkey: our peer id), and the model in the index."""
    peer = node.peer_id.to_base58()
    expiration_time = get_dht_time() + expiration
    keys = [block_key(model_id, i) for i in range(info.start, info.end)]
    subkeys = [peer] * len(keys)
    values = [info.to_dict()] * len(keys)
    if model_info is not None and not model_id.startswith("_"):
        keys.append(MODELS_KEY)
        subkeys.append(f"{model_id} {peer}")  # signed records name their signer: one index entry per server
        values.append(model_info.to_dict())
    stored = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return all(stored.values())


async def fetch_block_infos(node: DHTNode, model_id: str, block_indices: list[int]) -> list[dict[str, ServerInfo]]:
    """For each block, the servers announcing it: peer id (base58) -> record. Malformed records are skipped."""
    keys = [block_key(model_id, i) for i in block_indices]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    result = []
    for key in keys:
        servers: dict[str, ServerInfo] = {}
        entry = found.get(key)
        if entry is not None and isinstance(entry.value, dict):
            for peer, item in entry.value.items():
                info = ServerInfo.from_dict(getattr(item, "value", None))
                if isinstance(peer, str) and info is not None:
                    servers[peer] = info
                    if info.relay_addrs or lookup(peer):  # behind NAT: dialed through its relay
                        remember(peer, info.relay_addrs)
        result.append(servers)
    return result


def merge_records(per_block: list[dict[str, ServerInfo]]) -> dict[str, ServerInfo]:
    """One record per server from per-block records (a server moving its span announces two: prefer the online
    one)."""
    servers: dict[str, ServerInfo] = {}
    for block_servers in per_block:
        for peer, info in block_servers.items():
            known = servers.get(peer)
            if known is None or (known.state != ServerState.ONLINE and info.state == ServerState.ONLINE):
                servers[peer] = info
    return servers


async def fetch_models(node: DHTNode) -> dict[str, ModelInfo]:
    """Every announced model; when servers disagree on a model's description, the most announced one wins."""
    entry = await node.get(MODELS_KEY, sufficient_expiration_time=float("inf"))
    votes: dict[str, Counter] = {}
    if entry is not None and isinstance(entry.value, dict):
        for subkey, item in entry.value.items():
            info = ModelInfo.from_dict(getattr(item, "value", None))
            if isinstance(subkey, str) and " " in subkey and info is not None:
                votes.setdefault(subkey.rsplit(" ", 1)[0], Counter())[info] += 1
    return {model_id: counter.most_common(1)[0][0] for model_id, counter in votes.items()}
