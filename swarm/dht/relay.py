"""Relays for volunteers behind NAT: a public peer tells a server whether others can reach it, and forwards TCP
connections to a NATed server's libp2p port over connections that server opens to it (a reverse tunnel).

Why not libp2p's circuit relay: hivemind's p2pd (1.1.12) always answers relay requests with circuit relay v2's
built-in limits, 128 KiB per direction and 2 minutes per relayed connection (the daemon's flags to lift them
configure a second relay that is not the one answering; measured in emulated hosts), and a generation's activations
exceed that in seconds. Here the relay only copies bytes: libp2p's security handshake runs end to end through it,
so the relay sees ciphertext and cannot pose as the server (the client's handshake checks the peer id it dialed).

Protocol: JSON lines on the relay's TCP port; a connection's first line says what it is.
- ``{"op": "probe", "port": P}``: the relay dials back the address it sees the caller at, port P, and answers
  ``{"reachable": bool, "observed": IP}``: how a server learns that nobody can dial it (what AutoNAT does).
- ``{"op": "reserve", "peer": ID}``: the relay opens a public port for the caller and answers ``{"port": Q}``. While
  this control connection lives, each connection to Q is announced on it as ``{"op": "open", "token": T}``; the
  server answers with a new connection whose first line is ``{"op": "accept", "token": T}``, and the relay splices
  the two. The server pings every ``PING`` seconds; a silent or closed control connection ends the reservation.
Bounded: ``MAX_RESERVATIONS`` per relay, ``MAX_PENDING`` unanswered opens per reservation, ``MAX_SPLICES`` live
connections per reservation, first lines of at most 1 KiB read within ``OPEN_TIMEOUT`` seconds.

Relays announce themselves in the DHT under ``RELAYS_KEY`` (subkey: their peer id, signed like every record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from dataclasses import dataclass

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.utils.multiaddrs import ip_and_port

logger = logging.getLogger(__name__)

RELAYS_KEY = "_swarm.relays"
MAX_RESERVATIONS = 32
MAX_PENDING = 16
MAX_SPLICES = 256
OPEN_TIMEOUT = 10.0  # s: for a first line, a dial-back, a server's answer to an open
PING = 10.0  # s between a reserving server's pings; three missed end the reservation
MAX_LINE = 1024


async def _read_line(reader: asyncio.StreamReader, timeout: float) -> dict | None:
    """One JSON object line, or None (closed, too long, not JSON, too slow)."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, ValueError, ConnectionError, OSError):
        return None
    if not line or len(line) > MAX_LINE:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _write_line(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways until either side closes; then close both."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(2**16):
                writer.write(chunk)
                await writer.drain()

    pumps = [asyncio.ensure_future(pump(a[0], b[1])), asyncio.ensure_future(pump(b[0], a[1]))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        _close(a[1], b[1])


@dataclass
class _Reservation:
    peer: str
    control: asyncio.StreamWriter
    listener: asyncio.AbstractServer | None = None
    pending: int = 0
    splices: int = 0


class RelayService:
    """The relay's side (see the module docstring): ``await start()``, announce ``(host, port)``, ``await stop()``."""

    def __init__(self, host: str, port: int = 0, public_host: str | None = None,
                 max_reservations: int = MAX_RESERVATIONS, ports: range | None = None):
        """Listens on ``host:port``; ``public_host``: the address others reach it at (default: ``host``);
        ``ports``: where reserved ports are taken from (a firewall's opening; default: any free port)."""
        self.host, self.port, self.ports = host, port, ports
        self.max_reservations = min(max_reservations, len(ports)) if ports else max_reservations
        self.public_host = public_host or host
        self.server: asyncio.AbstractServer | None = None
        self.reservations: dict[int, _Reservation] = {}  # public port -> reservation
        self.waiting: dict[str, asyncio.Future] = {}  # token -> the inbound connection's future accept
        self.relayed_connections = 0  # spliced so far (reported in logs and tests)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_LINE * 2)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        for reservation in list(self.reservations.values()):
            _close(reservation.control)
            if reservation.listener is not None:
                reservation.listener.close()
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await _read_line(reader, OPEN_TIMEOUT)
        op = message.get("op") if message else None
        try:
            if op == "probe":
                await self._probe(writer, message.get("port"))
            elif op == "reserve":
                await self._reserve(reader, writer, message.get("peer"))
            elif op == "accept":
                await self._accept(reader, writer, message.get("token"))
        except (ConnectionError, OSError):
            pass
        finally:
            _close(writer)

    async def _probe(self, writer: asyncio.StreamWriter, port: object) -> None:
        observed = writer.get_extra_info("peername")[0]
        reachable = False
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            try:
                _, dialed = await asyncio.wait_for(asyncio.open_connection(observed, port), OPEN_TIMEOUT / 2)
                _close(dialed)
                reachable = True
            except (OSError, TimeoutError):
                pass
        _write_line(writer, {"reachable": reachable, "observed": observed})
        await writer.drain()

    async def _reserve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object) -> None:
        if not isinstance(peer, str) or len(self.reservations) >= self.max_reservations:
            _write_line(writer, {"error": "this relay has no free reservation"})
            await writer.drain()
            return
        reservation = _Reservation(peer, writer)
        for port in [p for p in self.ports if p not in self.reservations] if self.ports else [0]:
            try:
                reservation.listener = await asyncio.start_server(
                    lambda r, w: self._inbound(reservation, r, w), self.host, port)
                break
            except OSError:  # taken by something else
                continue
        if reservation.listener is None:
            _write_line(writer, {"error": "this relay has no free port"})
            await writer.drain()
            return
        port = reservation.listener.sockets[0].getsockname()[1]
        self.reservations[port] = reservation
        logger.info(f"Relaying port {port} to {peer[-8:]}")
        try:
            _write_line(writer, {"port": port})
            await writer.drain()
            while await _read_line(reader, 3 * PING) is not None:  # pings; anything else ends it too
                pass
        finally:
            del self.reservations[port]
            reservation.listener.close()
            logger.info(f"Reservation of {peer[-8:]} on port {port} ended")

    async def _inbound(self, reservation: _Reservation, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if reservation.pending >= MAX_PENDING or reservation.splices >= MAX_SPLICES:
            _close(writer)
            return
        token = secrets.token_hex(16)
        accepted = self.waiting[token] = asyncio.get_running_loop().create_future()
        reservation.pending += 1
        try:
            _write_line(reservation.control, {"op": "open", "token": token})
            await reservation.control.drain()
            other = await asyncio.wait_for(accepted, OPEN_TIMEOUT)
        except (ConnectionError, OSError, TimeoutError):
            _close(writer)
            return
        finally:
            reservation.pending -= 1
            self.waiting.pop(token, None)
        reservation.splices += 1
        self.relayed_connections += 1
        try:
            await splice((reader, writer), other[:2])
        finally:
            reservation.splices -= 1
            other[2].set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: object) -> None:
        accepted = self.waiting.get(token) if isinstance(token, str) else None
        if accepted is None or accepted.done():
            return
        done = asyncio.Event()
        accepted.set_result((reader, writer, done))
        await done.wait()  # the inbound side splices; this connection stays open until then


async def probe(host: str, port: int, own_port: int, timeout: float = 2 * OPEN_TIMEOUT) -> bool:
    """Whether the relay at ``host:port`` could dial us back on ``own_port``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        _write_line(writer, {"op": "probe", "port": own_port})
        await writer.drain()
        answer = await _read_line(reader, timeout)
    finally:
        _close(writer)
    if answer is None:
        raise ConnectionError(f"relay {host}:{port} did not answer the probe")
    return answer.get("reachable") is True


class Reservation:
    """The NATed server's side: holds a public port on a relay and answers its opens by connecting the relay to
    ``local`` (the server's own libp2p port). ``lost`` is set when the relay goes away."""

    def __init__(self, relay_host: str, relay_port: int, peer: str, local: tuple[str, int]):
        self.relay_host, self.relay_port, self.peer, self.local = relay_host, relay_port, peer, local
        self.public_port: int | None = None
        self.lost = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._writer: asyncio.StreamWriter | None = None

    @property
    def maddr(self) -> str:
        return f"/ip4/{self.relay_host}/tcp/{self.public_port}/p2p/{self.peer}"

    async def open(self, timeout: float = 2 * OPEN_TIMEOUT) -> str:
        """Reserve a port; returns the multiaddr others dial us at."""
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.relay_host, self.relay_port), timeout)
        _write_line(self._writer, {"op": "reserve", "peer": self.peer})
        await self._writer.drain()
        answer = await _read_line(reader, timeout)
        port = answer.get("port") if answer else None
        if not isinstance(port, int) or isinstance(port, bool):
            _close(self._writer)
            raise ConnectionError(f"relay {self.relay_host}:{self.relay_port} refused a reservation: "
                                  f"{(answer or {}).get('error', 'no answer')}")
        self.public_port = port
        self._spawn(self._control(reader))
        self._spawn(self._ping())
        return self.maddr

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            _close(self._writer)
        self.lost.set()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _control(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await _read_line(reader, 3 * PING)) is not None:
                if message.get("op") == "open" and isinstance(message.get("token"), str):
                    self._spawn(self._answer(message["token"]))
        finally:
            self.lost.set()
            logger.warning(f"Lost the relay at {self.relay_host}:{self.relay_port}")

    async def _ping(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not self.lost.is_set():
                _write_line(self._writer, {"op": "ping"})
                await self._writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.lost.wait(), PING)
        self.lost.set()

    async def _answer(self, token: str) -> None:
        try:
            relay = await asyncio.wait_for(asyncio.open_connection(self.relay_host, self.relay_port), OPEN_TIMEOUT)
        except (OSError, TimeoutError):
            return
        try:
            local = await asyncio.wait_for(asyncio.open_connection(*self.local), OPEN_TIMEOUT)
        except (OSError, TimeoutError):
            _close(relay[1])
            return
        _write_line(relay[1], {"op": "accept", "token": token})
        await splice(relay, local)


async def announce_relay(node: DHTNode, host: str, port: int, expiration: float) -> bool:
    """Offer relaying at ``host:port`` in the DHT (signed by ``node``'s key like every record)."""
    return await node.store(RELAYS_KEY, {"host": host, "port": port}, get_dht_time() + expiration,
                            subkey=node.peer_id.to_base58())


async def fetch_relays(node: DHTNode) -> list[tuple[str, int]]:
    """Relays announced in the DHT, as (host, port); malformed entries skipped."""
    found = await node.get(RELAYS_KEY, sufficient_expiration_time=float("inf"))
    if found is None or not isinstance(found.value, dict):
        return []
    relays = []
    for entry in found.value.values():
        value = getattr(entry, "value", None)
        if isinstance(value, dict) and isinstance(value.get("host"), str) and isinstance(value.get("port"), int) \
                and not isinstance(value.get("port"), bool) and 0 < value["port"] < 65536:
            relays.append((value["host"], value["port"]))
    return relays


def order_relays(relays: list[tuple[str, int]], initial_peers: list[str]) -> list[tuple[str, int]]:
    """Relays on the hosts of our initial peers first (the ones the operator chose to enter through, usually
    bootstrap nodes provisioned for it), the others after them; random within each group, spreading load."""
    chosen = {address[0] for address in map(ip_and_port, initial_peers) if address is not None}
    return sorted(random.sample(relays, len(relays)), key=lambda relay: relay[0] not in chosen)
