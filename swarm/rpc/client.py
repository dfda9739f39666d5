"""Calling a peer's swarm RPCs: one-shot calls and long-lived inference streams."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarm.rpc import protocol
from swarm.rpc.framing import DEFAULT_MAX_MESSAGE_BYTES, read_message, write_message
from swarm.utils.multiaddrs import transport_of
from swarm.utils.peer_addresses import lookup


class RemoteError(RuntimeError):
    """A server answered our request with an error (the request is at fault, or the server refused it).
    ``busy``: the server is full for now (memory, sessions, a queue): no fault of anyone's, try another."""

    def __init__(self, peer: str, message: str, busy: bool = False):
        super().__init__(f"server {peer[-8:]}: {message}")
        self.peer, self.remote_message, self.busy = peer, message, busy


class PeerUnavailable(ConnectionError):
    """The server could not be reached or the stream broke: worth retrying on another server."""

    def __init__(self, message: str, peer: str | None = None):
        super().__init__(message)
        self.peer = peer


async def connect(p2p: P2P, peer: PeerID, addresses: tuple[str, ...]) -> None:
    """Connect to ``peer`` at ``addresses`` (a NATed server's relayed ones, from its record): libp2p's peer routing
    only knows the private address such a server listens on. A no-op round trip to the daemon when connected."""
    # hivemind's P2P has no public call for a connect with addresses; its daemon client does (CONNECT request)
    await p2p._client.connect(peer, [Multiaddr(transport_of(address)) for address in addresses])


class Stream:
    """A bidirectional message stream to one peer's handler."""

    def __init__(self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.peer, self.reader, self.writer, self.max_bytes = peer, reader, writer, max_bytes

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID | str, handler: str, timeout: float | None = None) -> Stream:
        peer = PeerID.from_base58(peer) if isinstance(peer, str) else peer
        try:
            if relayed := lookup(peer.to_base58()):
                await asyncio.wait_for(connect(p2p, peer, relayed), timeout)
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), timeout)
        except TimeoutError as e:
            raise PeerUnavailable(f"server {peer.to_base58()[-8:]} did not accept a stream in {timeout} s",
                                  peer.to_base58()) from e
        except Exception as e:
            raise PeerUnavailable(f"cannot reach server {peer.to_base58()[-8:]}: {e}", peer.to_base58()) from e
        return cls(peer, reader, writer)

    async def send(self, message: dict) -> None:
        try:
            await write_message(self.writer, message)
        except (ConnectionError, OSError) as e:
            raise PeerUnavailable(f"connection to server {self.peer.to_base58()[-8:]} broke: {e}",
                                  self.peer.to_base58()) from e

    async def receive(self, timeout: float | None = None) -> dict:
        """The next reply; raises ``RemoteError`` for an error reply, ``PeerUnavailable`` if the stream broke."""
        peer = self.peer.to_base58()
        try:
            reply = await asyncio.wait_for(read_message(self.reader, self.max_bytes), timeout)
        except TimeoutError as e:
            raise PeerUnavailable(f"server {peer[-8:]} did not answer in {timeout} s", peer) from e
        except (ConnectionError, OSError, ValueError) as e:
            raise PeerUnavailable(f"connection to server {peer[-8:]} broke: {e}", peer) from e
        if reply is None:
            raise PeerUnavailable(f"server {peer[-8:]} closed the stream", peer)
        if "error" in reply:
            raise RemoteError(peer, str(reply["error"]), busy=reply.get("busy") is True)
        return reply

    async def request(self, message: dict, timeout: float | None = None) -> dict:
        try:
            await self.send(message)
        except PeerUnavailable:
            # The server may have refused the message from its header and closed the stream: show its reason.
            try:
                await self.receive(timeout=1.0)
            except RemoteError:
                raise
            except Exception:
                pass
            raise
        return await self.receive(timeout)

    def close(self) -> None:
        with suppress(Exception):
            self.writer.close()


async def measure_rtt(p2p: P2P, peer: PeerID | str, timeout: float) -> float | None:
    """Seconds for an ``info`` round trip to ``peer`` (handler time included), or None if it did not answer."""
    started = time.perf_counter()
    try:
        await call(p2p, peer, protocol.INFO, {}, timeout=timeout)
    except Exception:
        return None
    return time.perf_counter() - started


async def call(p2p: P2P, peer: PeerID | str, handler: str, message: dict, timeout: float | None = None) -> dict:
    """One request, one reply, on a fresh stream."""
    stream = await Stream.open(p2p, peer, handler, timeout)
    try:
        return await stream.request(message, timeout)
    finally:
        stream.close()
