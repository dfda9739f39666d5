"""The WAN emulation proxy adds at least its delay and caps bandwidth (lower bounds only: timing upper bounds
would depend on the machine's load)."""

from __future__ import annotations

import asyncio
import time

from swarm.utils.wan_proxy import WanProxy


async def _echo_through_proxy(rtt_ms: float, mbit: float, payload: int) -> tuple[float, float]:
    async def echo(reader, writer):
        while data := await reader.read(2**16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = WanProxy(server.sockets[0].getsockname()[1], rtt_ms, mbit)
    reader, writer = await asyncio.open_connection("127.0.0.1", await proxy.start())
    started = time.monotonic()
    writer.write(b"x")
    await reader.readexactly(1)
    rtt = time.monotonic() - started
    started = time.monotonic()
    writer.write(b"y" * payload)
    await reader.readexactly(payload)
    transfer = time.monotonic() - started
    writer.close()
    proxy.server.close()
    server.close()
    return rtt, transfer


def test_proxy_adds_delay_and_caps_bandwidth():
    rtt, transfer = asyncio.run(_echo_through_proxy(rtt_ms=40, mbit=8, payload=500_000))
    assert rtt >= 0.040
    assert transfer >= 500_000 * 8 / 8e6  # 0.5 s at 8 Mbit/s, each way overlapping
