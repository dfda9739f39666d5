"""A swarm server: loads a span of blocks, serves it over libp2p, and announces it in the DHT until stopped.

With ``--num-blocks N`` instead of ``--blocks``, the server picks the span that most raises the swarm's weakest
block throughput, re-checks now and then, and moves when that clearly helps: it loads the new span first, serves
new requests there, lets open sessions finish on the old one, and only then drops it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import swarm
from swarm.blocks.quantization import parameter_bytes
from swarm.blocks.served import SpanSpeed
from swarm.blocks.span import BlockSpan, load_config
from swarm.blocks.weights import DTYPES, span_weights_commitment
from swarm.compression import blockwise
from swarm.dht.identity import Identity
from swarm.dht.node import is_loopback, local_host, public_host, start_dht, stop_dht, tcp_port, visible_maddrs
from swarm.dht.records import announce_span, fetch_block_infos, merge_records
from swarm.dht.relay import RelayService, Reservation, announce_relay, fetch_relays, order_relays, probe
from swarm.dht.schema import ModelInfo, ServerInfo, ServerState
from swarm.hub.source import ModelSource, default_model_id, resolve_model
from swarm.rpc import protocol
from swarm.rpc.client import measure_rtt
from swarm.server.block_selection import choose_span, should_move
from swarm.server.compute import ComputeQueue, single
from swarm.server.handler import Handler, Limits
from swarm.server.sessions import SessionTable
from swarm.server.settlement import SessionSettlement
from swarm.server.throughput import get_span_speed
from swarm.trust.faults import Faults
from swarm.utils.cli import interrupt_requested
from swarm.utils.errors import UserError
from swarm.utils.multiaddrs import transport_of
from swarm.utils.threads import call_in_serial_thread, run_torch_serially_in_this_thread

if TYPE_CHECKING:
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P

    from swarm.blocks.unet import UNetLevels

logger = logging.getLogger(__name__)



class BlocksOutsideModel(UserError, ValueError):
    """``--blocks`` names blocks the model does not have."""


@dataclass
class ServerConfig:
    model: str | None  # local path or hub name; None: the embedded default model
    start: int | None = None  # --blocks START:END ...
    end: int | None = None
    num_blocks: int | None = None  # ... or --num-blocks N: chosen from the swarm's coverage, rebalanced
    initial_peers: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0
    announce_maddrs: list[str] | None = None  # what others should dial, if not the listening address
    # "auto": ask a relay to dial us back, and serve through a relay if it cannot (behind NAT); "direct": never use
    # a relay; "relay": always (e.g. a firewall that the dial-back cannot see)
    reachability: str = "auto"
    relay: bool = False  # offer relaying to servers behind NAT (a server others can reach directly)
    relay_port: int = 0  # the relay's TCP port (0: any free one; it is announced in the DHT)
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str = "none"  # weights: none / int8 / nf4 (bitsandbytes)
    adapters: list[str] = field(default_factory=list)  # peft LoRA adapters served beside the blocks (NAME=PATH ...)
    cache_tokens: int = 16384  # KV budget: batch x positions over the whole span
    public_name: str | None = None
    model_id: str | None = None  # DHT name of the model; default: hub name or local directory name
    update_period: float = 30.0  # seconds between announcements
    balance_period: float = 120.0  # mean seconds between rebalancing checks (with --num-blocks)
    throughput: str | float = "auto"  # "auto": measure once and cache; "eval": re-measure; a number: use it
    identity_path: str | None = None
    limits: Limits = field(default_factory=Limits)
    settlement: str | None = None  # backend name (entry point group swarm.settlement); None: no receipts at all
    settlement_options: dict[str, str] = field(default_factory=dict)  # backend options (--settlement-option k=v)
    price: int = 1  # per token (batch row x position), in the backend's smallest unit
    settlement_period: float = 1.0  # seconds between settlement batches
    # Refuse sessions of clients that do not settle, and steps of sessions whose client stopped countersigning.
    require_payment: bool = False
    # Zero-knowledge proofs of challenged forwards (swarm/server/proofs.py): a directory for circuits and keys
    # (None: no proofs), where the SRS is (default: that directory), and the longest sequence proven.
    zk: str | None = None
    zk_srs: str | None = None
    zk_max_positions: int = 8
    # Extra records published with every announcement, each ``await announcer(node, model_id, expiration)``: e.g.
    # the acceleration summary of --acceleration-history (swarm/acceleration/summaries.py), added by the CLI.
    announcers: list[Callable[[DHTNode, str, float], Awaitable[None]]] = field(default_factory=list)


class Server:
    def __init__(self, config: ServerConfig):
        if (config.num_blocks is None) == (config.start is None):
            raise ValueError("give either blocks (start, end) or num_blocks")
        self.config = config
        self.model_id = config.model_id or default_model_id(config.model)
        self.stopped = asyncio.Event()
        self.state = ServerState.JOINING
        self.start, self.end = config.start, config.end  # the span being served now
        self.span: BlockSpan | None = None
        self.sessions: SessionTable | None = None
        self.speed: SpanSpeed | None = None
        self.handler: Handler | None = None
        self.maddrs: list[str] = []  # where others dial us, once ready
        self.next_pings: dict[str, float] = {}  # peer -> EMA of RTT (s) to servers holding the block after ours
        self.started_at = time.time()  # announced: clients tell a restarted server from the one they banned
        self.reservation: Reservation | None = None  # behind NAT: our port on a relay (swarm/dht/relay.py)
        self.relay_service: RelayService | None = None  # with --relay: relaying for others

    # ---- what we announce

    def info(self, state: ServerState | None = None, span: tuple[int, int] | None = None) -> ServerInfo:
        cfg = self.config
        speed = self.speed or (self.handler.measured_speed() if self.handler else None)
        start, end = span or (self.start, self.end)
        return ServerInfo(
            state=state if state is not None else self.state, start=start, end=end, dtype=cfg.dtype,
            quantization=cfg.quantization, version=swarm.__version__, public_name=cfg.public_name,
            cache_tokens_left=self.sessions.tokens_left if self.sessions else 0,
            max_session_length=cfg.limits.max_session_length,
            throughput=speed.forward_tps if speed else None, inference_rps=speed.inference_rps if speed else None,
            forward_tps=speed.forward_tps if speed else None, load=float(self.handler.pending if self.handler else 0),
            next_pings=dict(self.next_pings), started=self.started_at, announced=time.time(),
            price=cfg.price if cfg.settlement else 0, payment_required=cfg.require_payment,
            adapters=tuple(self.span.adapters.names if isinstance(self.span, BlockSpan) else self.span.adapter_names)
            if self.span is not None else (),
            using_relay=self.reservation is not None,
            relay_addrs=(self.reservation.maddr,) if self.reservation is not None else (),
            weights=getattr(self.span, "weights_commitment", "") if self.span is not None
            and (self.span.start, self.span.end) == (start, end) else "",
        )

    def rpc_info(self) -> dict:
        return {**self.info().to_dict(), "model_id": self.model_id, "protocol": protocol.PROTOCOL_VERSION,
                "hidden_size": getattr(self.span, "hidden_size", None), "sessions": len(self.sessions.sessions),
                "max_message_bytes": self.config.limits.max_message_bytes,
                "pushes": dict(self.handler.pushes) if self.handler else {},
                "served": {**self.handler.served, "steps": self.handler.steps_served,
                           "dropped": self.handler.compute_queue.dropped,
                           "failures": self.handler.failures,
                           "cost_refusals": self.handler.cost_refusals} if self.handler else {},
                "max_batch_tokens": self.config.limits.max_batch_tokens,
                "settlement": self.handler.settlement.stats() if self.handler and self.handler.settlement else None,
                "proofs": self.handler.prover.stats() if self.handler and self.handler.prover else None,
                "features": self._feature_bytes()}

    def _feature_bytes(self) -> int:
        """Bytes of U-Net features the open sessions keep captured (freed when a session closes)."""
        if self.sessions is None:
            return 0
        stores = [getattr(s.state, "features", None) for s in list(self.sessions.sessions.values())]
        return sum(store.bytes for store in stores if store is not None)

    # ---- lifecycle

    async def run(self) -> None:
        cfg = self.config
        # Heavy torch work runs on the compute thread only (this event loop checks requests, serially): one OpenMP
        # pool per process, see swarm/utils/threads.py. Loading and the speed measurement run there too.
        run_torch_serially_in_this_thread()
        self.compute = ComputeQueue(name="compute")
        source = await self.compute.run("server", single(lambda: resolve_model(cfg.model)))
        self.is_unet = await asyncio.to_thread(_is_unet_source, source)
        if self.is_unet:  # blocks are U-Net levels: (down i, up n-1-i), and the mid block last
            from swarm.blocks.unet import build_unet_skeleton, load_unet_config, num_levels

            unet_config, _ = load_unet_config(source)
            self.model_info = ModelInfo(num_levels(build_unet_skeleton(unet_config)),
                                        repository=source.repo_id or source.name,
                                        model_type=unet_config["_class_name"])
        else:
            model_config = await asyncio.to_thread(load_config, source)
            self.model_info = ModelInfo(model_config.num_hidden_layers, repository=source.repo_id or source.name,
                                        model_type=model_config.model_type)
        total = self.model_info.num_blocks
        if cfg.num_blocks is None and not 0 <= cfg.start < cfg.end <= total:
            raise BlocksOutsideModel(f"--blocks {cfg.start}:{cfg.end} is outside the model's 0:{total}: "
                                     f"{source.name} has {total} blocks")

        # The libp2p key signs our records; persisted with --identity so our peer id (and reputation) survives.
        identity = await asyncio.to_thread(Identity.load_or_create, cfg.identity_path)
        p2p, node = await start_dht(cfg.initial_peers, host=cfg.host, port=cfg.port,
                                    announce_maddrs=cfg.announce_maddrs, identity=identity)
        if not is_loopback(cfg.host) and cfg.reachability != "direct":
            p2p, node = await self.reach_through_relay_if_needed(p2p, node, identity)
        if cfg.relay and self.reservation is None:
            await self.start_relay_service(p2p)
        self.node = node
        if threading.current_thread() is threading.main_thread():  # not for a server on a thread (in_process.py)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stopped.set)
            if interrupt_requested():  # a Ctrl-C during start-up whose KeyboardInterrupt a library swallowed
                self.stopped.set()
        self.expiration = max(2.5 * cfg.update_period, 10.0)
        try:
            if cfg.num_blocks is not None:
                servers = await self.fetch_servers()
                known = [i.throughput for i in servers.values() if i.throughput]
                guess = statistics.median(known) if known else 1.0  # ours is measured once the span is loaded
                self.start, self.end = choose_span(servers, total, cfg.num_blocks, guess, self.peer_id)
                logger.info(f"Chose blocks {self.start}:{self.end} from the swarm's coverage")
            await self.announce()
            self.span = await self.load_span(source, self.start, self.end)
            self.speed = await self.compute.run("server", single(self.measure_speed))
            self.sessions = self.session_table()
            self.handler = Handler(self.span, self.sessions, cfg.limits, self.rpc_info, self.compute)
            if cfg.settlement:
                self.handler.settlement = SessionSettlement(cfg.settlement, cfg.settlement_options, identity,
                                                            self.model_id, cfg.price, cfg.settlement_period,
                                                            cfg.require_payment)
            if cfg.zk:
                from swarm.server.proofs import Prover

                self.handler.prover = Prover(cfg.zk, cfg.zk_srs, cfg.zk_max_positions, self.handler.faults)
            await self.handler.register(p2p)

            self.state = ServerState.ONLINE
            await self.announce()
            self.maddrs = maddrs = await visible_maddrs(p2p)
            print(f"Server ready: blocks {self.start}:{self.end} of {self.model_id} as peer {p2p.peer_id}",
                  flush=True)
            print("Join this swarm with: --initial-peers " + " ".join(maddrs), flush=True)
            await self.serve_until_stopped(source)

            logger.info("Shutting down: announcing offline")
            self.state = ServerState.OFFLINE
            with suppress(Exception):
                await asyncio.wait_for(self.announce(with_model=False), 5)
        finally:
            if self.handler is not None:
                self.handler.shutdown()
                if self.handler.settlement is not None:  # settles what is still queued
                    await asyncio.to_thread(self.handler.settlement.stop)
            if self.reservation is not None:
                await self.reservation.close()
            if self.relay_service is not None:
                await self.relay_service.stop()
            await stop_dht(p2p, node)

    async def serve_until_stopped(self, source: ModelSource) -> None:
        next_balance = self._next_balance_check()
        while not self.stopped.is_set():
            # a lost relay does not wait for the next announcement: clients cannot reach us meanwhile
            events = [self.stopped] + ([self.reservation.lost] if self.reservation is not None
                                       and not self.reservation.lost.is_set() else [])
            waiters = [asyncio.ensure_future(event.wait()) for event in events]
            try:
                await asyncio.wait(waiters, timeout=self.config.update_period, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if self.stopped.is_set():
                return
            with suppress(Exception):
                await self.ping_next_servers()
            if self.reservation is not None and self.reservation.lost.is_set():
                await self.move_to_another_relay()
            await self.announce()
            if self.config.num_blocks is not None and time.monotonic() >= next_balance:
                next_balance = self._next_balance_check()
                try:
                    await self.rebalance(source)
                except Exception:
                    logger.exception("Rebalancing failed; staying on the current blocks")

    def _next_balance_check(self) -> float:
        # jittered, so servers that joined together do not all move at the same moment
        return time.monotonic() + self.config.balance_period * random.uniform(0.5, 1.5)

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    async def announce(self, with_model: bool = True) -> None:
        await announce_span(self.node, self.model_id, self.info(), self.model_info if with_model else None,
                            self.expiration)
        if self.relay_service is not None and with_model:
            with suppress(Exception):
                await announce_relay(self.node, self.relay_service.public_host, self.relay_service.port,
                                     self.expiration)
        if with_model:
            for announcer in self.config.announcers:
                await announcer(self.node, self.model_id, self.expiration)

    # ---- behind NAT

    async def reach_through_relay_if_needed(self, p2p: P2P, node: DHTNode,
                                            identity: Identity) -> tuple[P2P, DHTNode]:
        """Ask a relay whether it can dial us; if not (or with ``reachability="relay"``), reserve a port on one and
        rejoin the DHT as a client (others could not reach us to store or look up records), announcing the relayed
        address. Returns the (possibly new) daemon and node."""
        cfg = self.config
        own_port = tcp_port(await visible_maddrs(p2p))
        relays = order_relays(await fetch_relays(node), cfg.initial_peers)
        if not relays:
            if cfg.reachability == "relay":
                await stop_dht(p2p, node)
                raise UserError("--reachability relay: no relay is announced in this swarm (bootstrap nodes offer "
                                "one unless started with --no-relay; servers with --relay)")
            logger.info("No relay is announced: serving without a reachability check")
            return p2p, node
        if cfg.reachability == "auto":
            for host, port in relays[:3]:
                try:
                    reachable = await probe(host, port, own_port)
                except (OSError, TimeoutError, ConnectionError) as e:
                    logger.info(f"Relay {host}:{port} did not answer a probe ({e})")
                    continue
                if reachable:
                    logger.info(f"Reachable directly (relay {host}:{port} dialed us back)")
                    return p2p, node
                break
            else:
                logger.warning("No relay answered a reachability probe: serving without one")
                return p2p, node
        if not await self.reserve_on_a_relay(relays, node.peer_id.to_base58(), (local_host(cfg.host), own_port)):
            logger.warning("Not reachable, and no relay took a reservation: others cannot dial this server")
            return p2p, node
        logger.info(f"Behind NAT: serving through the relay at {self.reservation.maddr}")
        await stop_dht(p2p, node)
        return await start_dht(cfg.initial_peers, host=cfg.host, port=own_port, client_mode=True, identity=identity,
                               announce_maddrs=[transport_of(self.reservation.maddr)])

    async def reserve_on_a_relay(self, relays: list[tuple[str, int]], peer: str, local: tuple[str, int]) -> bool:
        """Reserve on the first relay of ``relays`` that takes us, tunnelling to ``local`` (our daemon's port)."""
        for host, port in relays:
            reservation = Reservation(host, port, peer, local)
            try:
                await reservation.open()
            except (OSError, TimeoutError, ConnectionError) as e:
                logger.info(f"Relay {host}:{port} took no reservation ({e})")
                continue
            self.reservation = reservation
            return True
        return False

    async def move_to_another_relay(self) -> None:
        lost = (self.reservation.relay_host, self.reservation.relay_port)
        relays = order_relays([relay for relay in await fetch_relays(self.node) if relay != lost],
                              self.config.initial_peers)
        if await self.reserve_on_a_relay(relays + [lost], self.peer_id, self.reservation.local):
            logger.info(f"Moved to the relay at {self.reservation.maddr}")

    async def start_relay_service(self, p2p: P2P) -> None:
        """With --relay: forward connections to servers behind NAT (announced in the DHT with every announcement)."""
        public = public_host(self.config.host, await visible_maddrs(p2p))
        if public is None:
            logger.warning("--relay: no address others could reach a relay at; not relaying")
            return
        self.relay_service = RelayService(self.config.host, self.config.relay_port, public_host=public)
        await self.relay_service.start()
        logger.info(f"Relaying for servers behind NAT at {public}:{self.relay_service.port}")

    async def fetch_servers(self) -> dict[str, ServerInfo]:
        """Every server of this model, one record each (its online one if it announces several spans)."""
        return merge_records(await fetch_block_infos(self.node, self.model_id,
                                                     list(range(self.model_info.num_blocks))))

    async def load_span(self, source: ModelSource, start: int, end: int) -> BlockSpan | UNetLevels:
        """Loads on the compute thread before serving starts; later (a move) in a thread of its own, serially, so
        that requests keep being served meanwhile."""
        if self.handler is None:
            return await self.compute.run("server", single(lambda: self._load_span(source, start, end)))
        return await asyncio.to_thread(call_in_serial_thread, lambda: self._load_span(source, start, end))

    def _load_span(self, source: ModelSource, start: int, end: int) -> BlockSpan | UNetLevels:
        cfg = self.config
        logger.info(f"Loading blocks {start}:{end} of {source.name} ({cfg.dtype}, {cfg.quantization} weights, "
                    f"on {cfg.device})...")
        if self.is_unet:
            if cfg.quantization != "none":
                raise NotImplementedError("weight quantization of U-Net levels is not supported yet")
            from swarm.blocks.unet import UNetLevels

            span = UNetLevels.from_pretrained(source, start, end, dtype=DTYPES[cfg.dtype],
                                           device=cfg.device)
            logger.info(f"Levels hold {parameter_bytes(span) / (end - start) / 2**20:.1f} MiB each")
        else:
            span = BlockSpan.from_pretrained(source, start, end, dtype=DTYPES[cfg.dtype],
                                           device=cfg.device, quantization=cfg.quantization, adapters=cfg.adapters)
            logger.info(f"Blocks hold {parameter_bytes(span.layers) / (end - start) / 2**20:.1f} MiB each")
        Faults.from_env().edit_one_weight(span)  # tests only: see swarm/trust/faults.py
        # what clients requiring reference weights compare with their own copy's (swarm/trust/weights.py)
        span.weights_commitment = span_weights_commitment(span)
        if self.is_unet and cfg.adapters:  # injected into the levels' modules: after the base weights' commitment
            span.load_adapters(list(cfg.adapters))
        blockwise.warm_up()  # bitsandbytes' first call imports it (~2-3 s)
        return span

    def measure_speed(self) -> SpanSpeed | None:
        if isinstance(self.config.throughput, (int, float)):
            value = float(self.config.throughput)
            return SpanSpeed(inference_rps=value, forward_tps=value)
        if self.is_unet:
            # Measured once now, then on every evaluation served (an EMA the handler announces): no fixed figure.
            try:
                speed = self.span.measure_at_start()
                if speed is not None:
                    logger.info(f"Levels' speed: {speed.inference_rps:.2f} evaluations/s at the model's own size")
            except Exception:  # an architecture the probe does not know: the first requests will tell
                logger.warning("Could not measure the levels' speed at start", exc_info=True)
            return None
        speed = get_span_speed(self.span, self.model_id, force=self.config.throughput == "eval")
        self.span.set_measured_speed(speed.forward_tps)  # what predicts a request's compute time (cost bounds)
        return speed

    def session_table(self) -> SessionTable:
        """One memory budget for the sessions: ``--cache-tokens`` positions over the whole span for a transformer
        server (announced in tokens); for U-Net levels, ``max_diffusion_sessions`` generations at the model's own
        size with guidance (announced in such generations)."""
        cfg = self.config
        if self.is_unet:
            unit = max(1, self.span.reference_session_bytes())
            return SessionTable(cfg.limits.max_diffusion_sessions * unit, unit, "generations")
        unit = (self.end - self.start) * self.span.kv_bytes_per_position()
        return SessionTable(cfg.cache_tokens * unit, unit, "tokens")

    # ---- measurements of the swarm around us

    async def ping_next_servers(self, max_peers: int = 5) -> None:
        """RTTs to (a few of) the servers holding the block right after our span, as an EMA per peer."""
        if self.end >= self.model_info.num_blocks:
            self.next_pings.clear()
            return
        infos = (await fetch_block_infos(self.node, self.model_id, [self.end]))[0]
        peers = [p for p, i in infos.items() if i.state == ServerState.ONLINE and p != self.peer_id]
        random.shuffle(peers)

        async def ping(peer: str) -> None:
            rtt, old = await measure_rtt(self.node.p2p, peer, timeout=5), self.next_pings.get(peer)
            if rtt is None:
                self.next_pings.pop(peer, None)
            else:
                self.next_pings[peer] = rtt if old is None else 0.7 * old + 0.3 * rtt

        await asyncio.gather(*(ping(peer) for peer in peers[:max_peers]))
        for peer in set(self.next_pings) - set(peers):
            del self.next_pings[peer]

    # ---- rebalancing

    async def _move_target(self) -> tuple[int, int] | None:
        return should_move(await self.fetch_servers(), self.model_info.num_blocks, self.peer_id,
                           (self.start, self.end), self.speed.forward_tps if self.speed else 1.0)

    async def rebalance(self, source: ModelSource) -> None:
        target = await self._move_target()
        if target is None:
            return
        # Servers that see the same gap at once would all rush to it: wait a little and look again.
        await asyncio.sleep(random.uniform(0, min(5.0, self.config.update_period * 2)))
        target = await self._move_target()
        if target is None:
            return
        old = (self.start, self.end)
        logger.info(f"Moving from blocks {old[0]}:{old[1]} to {target[0]}:{target[1]}: the swarm's weakest blocks "
                    "need it more")
        new_span = await self.load_span(source, *target)  # the old span keeps serving meanwhile
        self.span = new_span
        self.handler.set_span(new_span)  # new requests go here; open sessions finish on the old span
        self.start, self.end = target
        # Old blocks first, as offline (no new sessions); then the new span, whose records overwrite the overlap.
        await announce_span(self.node, self.model_id, self.info(ServerState.OFFLINE, span=old), None, self.expiration)
        await self.announce()
        logger.info(f"Now serving blocks {target[0]}:{target[1]}; sessions on {old[0]}:{old[1]} finish there")



def _is_unet_source(source: ModelSource) -> bool:
    """diffusers (~2.5 s to import) is loaded only by servers whose model is one."""
    if not source.is_diffusers_layout():
        return False
    from swarm.blocks.unet import is_unet_source

    return is_unet_source(source)
