"""The relay's reverse tunnel and dial-back probe (swarm/dht/relay.py), in-process on 127.0.0.1 with a plain TCP echo
service standing in for a NATed server's libp2p port; across real NAT, see tests/test_hosts.py."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from swarm.dht.relay import RelayService, Reservation, order_relays, probe
from swarm.local_swarm import free_port


async def echo_service() -> asyncio.AbstractServer:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(2**16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_a_reservation_carries_large_transfers_both_ways_and_ends_with_the_relay():
    async def scenario() -> None:
        echo = await echo_service()
        relay = RelayService("127.0.0.1", 0)
        relay_port = await relay.start()
        reservation = Reservation("127.0.0.1", relay_port, "QmPeer", echo.sockets[0].getsockname()[:2])
        maddr = await reservation.open()
        public_port = reservation.public_port
        assert maddr == f"/ip4/127.0.0.1/tcp/{public_port}/p2p/QmPeer"

        payload = os.urandom(8 * 2**20)  # far beyond libp2p circuit relays' 128 KiB
        for _ in range(2):  # two connections: each gets its own tunnel
            reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
            writer.write(payload)
            await writer.drain()
            received = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
            assert received == payload
            writer.close()
        assert relay.relayed_connections == 2

        await relay.stop()  # the relay goes away: the server learns at once
        await asyncio.wait_for(reservation.lost.wait(), 10)
        await reservation.close()
        echo.close()

    asyncio.run(scenario())


def test_the_probe_tells_reachable_from_not():
    async def scenario() -> None:
        echo = await echo_service()
        relay = RelayService("127.0.0.1", 0)
        port = await relay.start()
        assert await probe("127.0.0.1", port, echo.sockets[0].getsockname()[1]) is True
        assert await probe("127.0.0.1", port, free_port()) is False  # nothing listens there
        await relay.stop()
        echo.close()

    asyncio.run(scenario())


def test_reservations_are_bounded_and_garbage_is_dropped():
    async def scenario() -> None:
        echo = await echo_service()
        first_port = free_port()
        relay = RelayService("127.0.0.1", 0, ports=range(first_port, first_port + 1))
        port = await relay.start()
        local = echo.sockets[0].getsockname()[:2]
        held = Reservation("127.0.0.1", port, "QmA", local)
        await held.open()
        assert held.public_port == first_port  # from the range given
        with pytest.raises(ConnectionError, match="no free reservation"):
            await Reservation("127.0.0.1", port, "QmB", local).open()
        # a first line that is not JSON, or too long, is closed without an answer
        for garbage in (b"hello\n", b"{" + b"x" * 5000 + b"}\n", json.dumps({"op": "accept", "token": 1}).encode()
                        + b"\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 15) == b""
            writer.close()
        await held.close()
        await relay.stop()
        echo.close()

    asyncio.run(scenario())


def test_a_natted_server_prefers_the_relays_of_the_peers_it_entered_through():
    relays = [("10.77.0.5", 4001), ("10.77.0.2", 4001), ("10.77.0.9", 4002), ("10.77.0.2", 4002)]
    for _ in range(20):  # (random order within each group)
        ordered = order_relays(relays, ["/ip4/10.77.0.2/tcp/31337/p2p/QmPeer", "/dns/boot.example/tcp/1/p2p/Qm"])
        assert sorted(ordered[:2]) == [("10.77.0.2", 4001), ("10.77.0.2", 4002)]
        assert sorted(ordered[2:]) == [("10.77.0.5", 4001), ("10.77.0.9", 4002)]
    assert {tuple(order_relays(relays, [])) for _ in range(50)} != {tuple(relays)}  # load is spread
