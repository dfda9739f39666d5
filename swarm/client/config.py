"""Client settings: how to reach the swarm and how patiently to wait for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from swarm.client.routing import RoutingPolicy
from swarm.utils.multiaddrs import require_initial_peers


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm node ($SWARM_INITIAL_PEERS)
    model_id: str | None = None  # DHT name of the model (default: derived from the name passed to from_pretrained)
    host: str = "127.0.0.1"  # where the client's own libp2p daemon listens; a client needs no inbound traffic
    connect_timeout: float = 10.0  # opening a stream to a server
    request_timeout: float = 120.0  # one forward/backward/step reply (long prefills on CPU servers take a while)
    max_retries: int = 3  # other servers tried after a server fails, per request
    # A decode step's server is given up after stall_factor x its slowest recent step, but not before stall_floor
    # seconds (None: always request_timeout). Its session then fails over, so a frozen server costs seconds.
    stall_floor: float | None = 2.0
    stall_factor: float = 10.0
    # A hop's first steps and prefills are given up after stall_factor x what its server's announced speed predicts,
    # but not before first_step_floor seconds (None: request_timeout): a server that claims speed it does not have,
    # or accepts sessions and never answers, costs this much once, then is banned.
    first_step_floor: float | None = 5.0
    update_period: float = 15.0  # re-read the DHT when the cached view is older than this
    ban_time: float = 30.0  # a server that failed is avoided for this long
    # A U-Net's swarm session left idle this long is closed (a pipeline built by hand around a RemoteUNet never says
    # when its generation ends; servers would hold its state until their own timeout). None: only at pipeline end.
    diffusion_idle_close: float | None = 30.0
    local_blocks: int = 0  # the first k blocks run on the client too: servers never see the embeddings' output
    verify_probability: float = 0.05  # chance that a step's hop is recomputed by another server and compared
    # When a check is one server's output against another's, the client computes the span itself (its weights loaded
    # from the checkpoint on demand) if it has at most this many blocks; 0: never (such checks then strike nobody).
    arbitration_blocks: int = 4
    push: bool = True  # servers hand step outputs straight to the next server (the client relays if they can't)
    # Settlement backend (entry point group swarm.settlement) whose receipts this client checks and countersigns;
    # None: receipts are ignored. Options: the backend's (evm: contract, private_key), and max_price (per token).
    settlement: str | None = None
    settlement_options: dict = field(default_factory=dict)
    receipt_interval: int = 16  # steps between countersigned receipts sent mid-session (one is sent at close too)
    routing_policy: RoutingPolicy = field(default_factory=RoutingPolicy)  # how to weigh servers, which to avoid
    # Use only servers whose signed weights commitment (swarm/trust/weights.py) matches: "reference" (computed from
    # the checkpoint the client loads, for each dtype/quantization servers announce), a checkpoint's path or name,
    # or trusted commitments {"START:END" or "START:END:DTYPE:QUANTIZATION": hex}. None: any weights.
    require_weights: str | dict[str, str] | None = None
    # Zero-knowledge proofs (swarm/client/proofs.py, needs ezkl): the chance that a forward hop is challenged (its
    # server, if started with --zk, proves it after the reply; the client checks the proof in the background
    # against a circuit of its own checkpoint's weights), where the client keeps its circuits and keys, and where
    # the structured reference strings shared with the provers are (default: zk_directory).
    zk_probability: float = 0.0
    zk_directory: str | None = None
    zk_srs: str | None = None
    max_pings_per_route: int = 32  # servers without a measured RTT pinged before choosing a chain
    max_batch_tokens: int = 4096  # batch x tokens per forward/backward request; larger batches are split
    max_parallel_chains: int = 4  # a large forward/backward batch may be split over this many chains at once
    # The LoRA adapter (as servers announce it: started with --adapters) every request runs with, on servers that
    # hold it; None: the base model. ``model.use_adapter(name)`` or ``generate(..., active_adapter=name)`` choose
    # another for some requests.
    active_adapter: str | None = None
    # Wire codec of hidden states passed from one server to the next ("none" is bit-exact).
    compression: str = "blockwise8"
    # Codec of the chain's ends: what the client sends the first server and what the last one sends back. None:
    # float16 under 8-bit compression, else the same as `compression`. Errors there hit the model's most fragile
    # points (raw embeddings; the LM head's input): on SmolLM2 over 2 servers, mean KL 1.4e-3 with every link in
    # 8-bit against 5e-4 with float16 ends, and the chat demo's first token flips with 8-bit ends.
    edge_compression: str | None = None
    # A prompt longer than this is sent in chunks of this many positions (None: in one step): bounds the servers'
    # peak activation memory and lets the first chunk's compute overlap the next chunk's transfer.
    prefill_chunk: int | None = None
    # Servers may run this session's decode steps in one call with other sessions' (swarm/server/batching.py);
    # False opts out, e.g. to time steps alone.
    server_batching: bool = True
    # Greedy batch-1 generate() calls check this many tokens per step, drafted by prompt lookup (the tokens that
    # followed the text's last n-gram where it occurred before; swarm/client/speculative.py). 0: off. The output
    # is the same either way; on input-grounded tasks (quoting, rewriting) decoding takes fewer swarm steps.
    prompt_lookup_tokens: int = 0
    # "auto": the acceleration method of each generate() is chosen by the learner from recorded history
    # (swarm/acceleration); a method name applies that method; None: the settings above as they are.
    acceleration: str | None = None
    acceleration_objective: str = "latency"  # "latency", "throughput" or "cost" (bytes on the wire)
    quality_floor: float = 0.9  # least expected greedy agreement with the exact path a chosen method must keep
    exploration: float = 0.05  # chance that "auto" tries another method, so the history keeps improving
    history_path: str | None = None  # SQLite file of recorded outcomes (None: acceleration.sqlite in the cache dir)

    @classmethod
    def with_options(cls, config: ClientConfig | None, initial_peers: Sequence[str],
                     options: dict[str, object]) -> ClientConfig:
        """``config`` (or the defaults) with ``initial_peers`` and keyword ``options`` set, as ``from_pretrained``
        takes them; an unknown option is a TypeError. The peers are ``initial_peers``, else the config's, else
        ``$SWARM_INITIAL_PEERS``, each checked: none at all, or a bad multiaddr, is a ``UserError`` right here, before
        anything is loaded (a client without peers would only fail at its first request)."""
        config = config or cls()
        for key, value in options.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown option {key!r}")
            setattr(config, key, value)
        config.initial_peers = require_initial_peers(initial_peers or config.initial_peers)
        return config

    @property
    def edge_codec(self) -> str:
        if self.edge_compression is not None:
            return self.edge_compression
        return "float16" if self.compression == "blockwise8" else self.compression
