"""What the health monitor knows about the swarm at one moment, as dataclasses and as documented JSON.

Built from the DHT's announcements plus the monitor's own probes (an ``info`` call to every online server):
a server that does not answer is *unreachable* and does not count towards coverage.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from swarm.dht.schema import ModelInfo, ServerInfo, ServerState
from swarm.trust.weights import ReferenceWeights
from swarm.utils.multiaddrs import ip_and_port


@dataclass
class ServerStatus:
    peer_id: str
    short_id: str  # last 8 characters of the peer id
    public_name: str | None
    start: int
    end: int
    state: str  # online / joining / offline, as announced
    reachable: bool | None  # answered the monitor's info call (None: not probed, the server is not online)
    rtt_ms: float | None  # round trip of that call, from the monitor
    dtype: str
    quantization: str
    throughput: float | None  # announced tokens/s over its span
    inference_rps: float | None  # announced decode steps/s over its span
    cache_tokens_left: int
    load: float
    version: str
    adapters: list[str] = field(default_factory=list)  # LoRA adapters served beside its blocks
    measured_rps: float | None = None  # decode steps/s of the monitor's one-position forward through its span
    # "ok"; "slower than claimed" (over 10x its announced step time, plus 0.1 s); "no answer" (takes the request,
    # never answers: a black hole); None: not probed
    claim: str | None = None
    # "direct", "relay" (behind NAT, answered through a circuit relay), "unreachable" (did not answer the
    # monitor); None: not probed (not online)
    reachability: str | None = None
    relay: str | None = None  # behind NAT: the relay it is reached through, as host:port
    warnings: list[str] = field(default_factory=list)  # what an operator should look at, in words
    settlement: dict | None = None  # its settlement totals as it reports them (info), with settlement on
    weights: str = ""  # the commitment to its weights it signed into its record (swarm/trust/weights.py)
    # "published": equals the commitment of the model's published weights (--reference-weights); "differs": does
    # not; "odd one out": no reference, and other servers of the same span and kind of weights agree on another
    # one; None: cannot tell
    weights_check: str | None = None


@dataclass
class ModelStatus:
    model_id: str
    num_blocks: int
    repository: str | None
    healthy: bool  # every block has an online, reachable server
    coverage: list[int]  # per block: online, reachable servers holding it (black holes excluded)
    block_states: list[str]  # per block: "ok" (2+ servers), "weak" (1), "missing" (0)
    servers: list[ServerStatus]
    throughput_sum: float  # announced throughput of the online, reachable servers
    weakest_block_throughput: float  # per block sum of those throughputs, minimum over blocks
    # a client could generate right now: every block has a reachable server that computes and has free cache
    can_generate: bool = False
    why_not: str | None = None  # when it cannot: which blocks lack such a server

    @property
    def missing_blocks(self) -> int:
        return sum(1 for count in self.coverage if count == 0)


@dataclass
class SwarmState:
    updated_at: float  # unix time of the refresh
    models: list[ModelStatus] = field(default_factory=list)
    rtts_ms: list[float] = field(default_factory=list)  # every reachable server's RTT, for quantiles

    @property
    def totals(self) -> dict:
        servers = {s.peer_id: s for m in self.models for s in m.servers}
        return {"models": len(self.models), "healthy_models": sum(m.healthy for m in self.models),
                "servers": len(servers), "servers_online": sum(s.reachable is True for s in servers.values()),
                "servers_unreachable": sum(s.reachable is False for s in servers.values())}

    def to_json(self) -> dict:
        return {"updated_at": self.updated_at, "totals": self.totals,
                "models": [{**dataclasses.asdict(m), "missing_blocks": m.missing_blocks} for m in self.models],
                "contributors": self.contributors}

    @property
    def contributors(self) -> list[dict]:
        """Settlement totals per server that reports settlement on (its own figures, from its info reply)."""
        servers = {s.peer_id: s for m in self.models for s in m.servers if s.settlement}
        return [{"peer_id": peer, "public_name": server.public_name, "backend": server.settlement.get("backend"),
                 "account": server.settlement.get("account"),
                 **{key: server.settlement.get(key, 0) for key in SETTLEMENT_TOTALS}}
                for peer, server in sorted(servers.items())]


# A server whose one-position forward takes over CLAIM_FACTOR times the step time it announces, plus CLAIM_SLACK
# seconds for what the probe adds beyond compute (decoding the request, the queue, a first call), is flagged.
CLAIM_FACTOR = 10.0
CLAIM_SLACK = 0.1
SETTLEMENT_TOTALS = ("receipts_settled", "earnings", "credited")  # integers from a server's settlement stats


def model_status(model_id: str, info: ModelInfo, servers: dict[str, ServerInfo],
                 probes: dict[str, float | None],
                 measured: dict[str, float | str | None] | None = None,
                 settlement: dict[str, dict] | None = None,
                 reference: ReferenceWeights | None = None) -> ModelStatus:
    """``probes``: RTT in seconds of each online server that answered, None for those that did not; ``measured``:
    the compute probe of each (monitor.py ``probe_compute``); ``settlement``: the settlement stats each reported;
    ``reference``: the model's published weights."""
    measured, settlement = measured or {}, settlement or {}
    newest = max((_version_key(record.version) for record in servers.values()), default=())
    statuses, coverage, throughput = [], [0] * info.num_blocks, [0.0] * info.num_blocks
    usable = [0] * info.num_blocks  # servers a client could use now: reachable, computing, with free cache
    for peer, record in sorted(servers.items(), key=lambda item: (item[1].start, item[0])):
        online = record.state == ServerState.ONLINE
        rtt = probes.get(peer) if online else None
        reachable = (rtt is not None) if online else None
        statuses.append(ServerStatus(
            peer_id=peer, short_id=peer[-8:], public_name=record.public_name, start=record.start, end=record.end,
            state=record.state.name.lower(), reachable=reachable, rtt_ms=None if rtt is None else rtt * 1000,
            dtype=record.dtype, quantization=record.quantization, throughput=record.throughput,
            inference_rps=record.inference_rps, cache_tokens_left=record.cache_tokens_left, load=record.load,
            version=record.version, adapters=list(record.adapters),
            reachability=None if reachable is None else "unreachable" if not reachable else
            "relay" if record.using_relay else "direct",
            relay=_relay_of(record),
            settlement=_settlement_totals(settlement.get(peer)) if reachable else None,
            weights=record.weights, weights_check=_weights_check(record, servers, reference),
            **_claim_check(record, measured.get(peer) if reachable else None)))
        statuses[-1].warnings = _warnings(statuses[-1], record, newest)
        if reachable and measured.get(peer) != "no answer":  # a black hole answers info but serves nothing
            for block in range(record.start, min(record.end, info.num_blocks)):
                coverage[block] += 1
                throughput[block] += record.throughput or 0.0
                usable[block] += record.cache_tokens_left > 0
    states = ["missing" if n == 0 else "weak" if n == 1 else "ok" for n in coverage]
    lacking = [block for block, n in enumerate(usable) if n == 0]
    return ModelStatus(
        model_id=model_id, num_blocks=info.num_blocks, repository=info.repository, healthy=all(coverage),
        coverage=coverage, block_states=states, servers=statuses,
        throughput_sum=sum((s.throughput or 0.0) for s in statuses if s.reachable and s.claim != "no answer"),
        weakest_block_throughput=min(throughput) if throughput else 0.0,
        can_generate=not lacking,
        why_not=f"no reachable server with free cache for block{'s' if len(lacking) > 1 else ''} "
                f"{_ranges(lacking)}" if lacking else None)


def _weights_check(record: ServerInfo, servers: dict[str, ServerInfo],
                   reference: ReferenceWeights | None) -> str | None:
    if not record.weights:
        return None
    if reference is not None:
        expected = reference.expected(record.start, record.end, record.dtype, record.quantization)
        if expected is not None:
            return "published" if record.weights == expected else "differs"
    kind = (record.start, record.end, record.dtype, record.quantization)
    votes = Counter(other.weights for other in servers.values() if other.weights
                    and (other.start, other.end, other.dtype, other.quantization) == kind)
    top, count = votes.most_common(1)[0]
    return "odd one out" if record.weights != top and count > votes[record.weights] else None


def _relay_of(record: ServerInfo) -> str | None:
    """"/ip4/H/tcp/P/p2p/ID" -> "H:P" (the first relayed address), None if it announces none."""
    found = ip_and_port(record.relay_addrs[0]) if record.relay_addrs else None
    return f"{found[0]}:{found[1]}" if found else None


def _version_key(version: str) -> tuple[int, ...]:
    """"0.10.1" -> (0, 10, 1): versions compare by number; what does not parse sorts first."""
    parts = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _warnings(server: ServerStatus, record: ServerInfo, newest: tuple[int, ...]) -> list[str]:
    warnings = []
    if server.reachable is False:
        warnings.append("not answering")
    if server.claim == "no answer":
        warnings.append("takes requests, never answers")
    elif server.claim == "slower than claimed":
        warnings.append("slower than it claims")
    if server.reachability == "relay":
        warnings.append("behind relay: slower")
    if server.state == "online" and server.reachable and record.cache_tokens_left == 0:
        warnings.append("no free cache")
    if server.weights_check == "differs":
        warnings.append("weights differ from the published ones")
    elif server.weights_check == "odd one out":
        warnings.append("weights differ from its span's other servers")
    if _version_key(record.version) < newest:
        warnings.append(f"old version ({record.version or 'unknown'})")
    return warnings


def _settlement_totals(stats: object) -> dict | None:
    if not isinstance(stats, dict):
        return None
    totals = {key: stats.get(key) for key in SETTLEMENT_TOTALS}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in totals.values()):
        return None
    return {**totals, **{key: stats[key] for key in ("backend", "account") if isinstance(stats.get(key), str)}}


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][-1] + 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _claim_check(record: ServerInfo, measured: float | str | None) -> dict:
    if measured is None:
        return {}
    if isinstance(measured, str):
        return {"claim": measured}
    slow = bool(record.inference_rps) and 1.0 / measured > CLAIM_FACTOR / record.inference_rps + CLAIM_SLACK
    return {"measured_rps": measured, "claim": "slower than claimed" if slow else "ok"}


_SERVER_SCHEMA = {
    "type": "object",
    "required": ["peer_id", "short_id", "start", "end", "state", "reachable", "dtype", "quantization",
                 "cache_tokens_left", "version"],
    "properties": {
        "peer_id": {"type": "string", "description": "libp2p peer id (base58)"},
        "short_id": {"type": "string", "description": "last 8 characters of the peer id"},
        "public_name": {"type": ["string", "null"], "description": "name the server chose to show"},
        "start": {"type": "integer", "minimum": 0, "description": "first block of its span"},
        "end": {"type": "integer", "minimum": 1, "description": "one past its last block"},
        "state": {"enum": ["online", "joining", "offline"], "description": "as announced in the DHT"},
        "reachable": {"type": ["boolean", "null"],
                      "description": "answered the monitor's info call; null when not online (not probed)"},
        "rtt_ms": {"type": ["number", "null"], "description": "round trip of the monitor's info call"},
        "dtype": {"type": "string"},
        "quantization": {"type": "string", "description": "weight quantization: none, int8 or nf4"},
        "throughput": {"type": ["number", "null"], "description": "announced tokens/s over its span"},
        "inference_rps": {"type": ["number", "null"], "description": "announced decode steps/s over its span"},
        "cache_tokens_left": {"type": "integer", "minimum": 0, "description": "free KV cache, batch x positions"},
        "load": {"type": "number", "minimum": 0, "description": "requests queued or running when announced"},
        "version": {"type": "string", "description": "swarm software version"},
        "measured_rps": {"type": ["number", "null"],
                         "description": "decode steps/s of the monitor's one-position forward through its span"},
        "claim": {"enum": ["ok", "slower than claimed", "no answer", None],
                  "description": "its announced speed against the monitor's measurement: ok; slower than claimed "
                                 "(over 10x its announced step time, plus 0.1 s); no answer (takes requests, never "
                                 "answers); null: not probed"},
        "adapters": {"type": "array", "items": {"type": "string"},
                     "description": "LoRA adapters served beside its blocks (a request names one to use it)"},
        "reachability": {"enum": ["direct", "relay", "unreachable", None],
                         "description": "direct; relay (behind NAT, reached through a circuit relay); unreachable "
                                        "(did not answer the monitor); null: not probed (not online)"},
        "relay": {"type": ["string", "null"], "description": "behind NAT: the relay it is reached through (host:port)"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "what an operator should look at, e.g. 'behind relay: slower', 'old version'"},
        "settlement": {"type": ["object", "null"],
                       "description": "settlement totals the server reports (receipts_settled, earnings, credited)"},
        "weights": {"type": "string", "description": "sha256 commitment to the exact weights it serves (signed)"},
        "weights_check": {"enum": ["published", "differs", "odd one out", None],
                          "description": "published: equals the model's published weights; differs: does not; odd "
                                         "one out: no reference, and its span's other servers agree on another; "
                                         "null: cannot tell"},
    },
}

STATE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "swarm health state (/api/v1/state)",
    "type": "object",
    "required": ["updated_at", "totals", "models"],
    "properties": {
        "updated_at": {"type": "number", "description": "unix time of the monitor's last refresh"},
        "totals": {
            "type": "object",
            "required": ["models", "healthy_models", "servers", "servers_online", "servers_unreachable"],
            "properties": {key: {"type": "integer", "minimum": 0} for key in
                           ("models", "healthy_models", "servers", "servers_online", "servers_unreachable")},
        },
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model_id", "num_blocks", "healthy", "coverage", "block_states", "servers",
                             "missing_blocks"],
                "properties": {
                    "model_id": {"type": "string", "description": "the name servers announce the model under"},
                    "num_blocks": {"type": "integer", "minimum": 1},
                    "repository": {"type": ["string", "null"]},
                    "healthy": {"type": "boolean", "description": "every block has an online, reachable server"},
                    "coverage": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                 "description": "per block: online, reachable servers holding it"},
                    "block_states": {"type": "array", "items": {"enum": ["ok", "weak", "missing"]},
                                     "description": "per block: 2+ servers, 1 server, none"},
                    "missing_blocks": {"type": "integer", "minimum": 0},
                    "throughput_sum": {"type": "number"},
                    "weakest_block_throughput": {"type": "number"},
                    "servers": {"type": "array", "items": _SERVER_SCHEMA},
                    "can_generate": {"type": "boolean",
                                     "description": "every block has a reachable server that computes and has free "
                                                    "cache: a client could generate now"},
                    "why_not": {"type": ["string", "null"], "description": "when it cannot: the blocks lacking one"},
                },
            },
        },
        "contributors": {
            "type": "array", "description": "settlement totals per server with settlement on, as each reports them",
            "items": {"type": "object", "required": ["peer_id", *SETTLEMENT_TOTALS],
                      "properties": {"peer_id": {"type": "string"}, "public_name": {"type": ["string", "null"]},
                                     "backend": {"type": ["string", "null"]}, "account": {"type": ["string", "null"]},
                                     **{key: {"type": "integer", "minimum": 0} for key in SETTLEMENT_TOTALS}}},
        },
    },
}
