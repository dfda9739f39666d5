"""A TCP proxy (on 127.0.0.1 unless told) that makes a link look like a WAN link: fixed one-way delay, bandwidth cap.

This machine has no netem qdisc, so benchmarks put one proxy in front of each server (which announces the proxy's
address with ``--announce-maddrs``) to show what routing and compression do at realistic latency and bandwidth.

    python -m swarm.utils.wan_proxy --listen-port 4001 --target-port 4000 --rtt-ms 50 --mbit 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time


class _Link:
    """One direction of a connection: bytes leave after the serialization time of the cap, arrive after delay."""

    def __init__(self, delay: float, bytes_per_second: float | None):
        self.delay, self.rate = delay, bytes_per_second
        self.free_at = 0.0  # when the emulated wire finishes sending what was queued before
        self.transferred = 0

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                arrival, chunk = await queue.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, arrival - time.monotonic()))
                writer.write(chunk)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while chunk := await reader.read(2**16):
                now = time.monotonic()
                sent = max(now, self.free_at) + (len(chunk) / self.rate if self.rate else 0.0)
                self.free_at = sent
                self.transferred += len(chunk)
                queue.put_nowait((sent + self.delay, chunk))
            queue.put_nowait((0.0, b""))
            await delivery
        finally:
            delivery.cancel()
            with contextlib.suppress(Exception):
                writer.close()


class WanProxy:
    def __init__(self, target_port: int, rtt_ms: float, mbit_s: float | None, listen_port: int = 0,
                 listen_host: str = "127.0.0.1", target_host: str = "127.0.0.1"):
        self.target_port, self.listen_port = target_port, listen_port
        self.listen_host, self.target_host = listen_host, target_host
        self.delay = rtt_ms / 2000.0  # one way
        self.rate = mbit_s * 1e6 / 8 if mbit_s else None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]
        return self.listen_port

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        upstream, downstream = _Link(self.delay, self.rate), _Link(self.delay, self.rate)
        await asyncio.gather(upstream.pump(client_reader, server_writer),
                             downstream.pump(server_reader, client_writer), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Delay and bandwidth-limit TCP traffic to a local port.")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--listen-host", default="127.0.0.1", help="(emulated hosts: 0.0.0.0)")
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time added (half each way)")
    parser.add_argument("--mbit", type=float, default=None, help="bandwidth cap per direction, Mbit/s")
    args = parser.parse_args()

    async def run() -> None:
        proxy = WanProxy(args.target_port, args.rtt_ms, args.mbit, args.listen_port, args.listen_host,
                         args.target_host)
        await proxy.start()
        print(f"WAN proxy ready: {args.listen_host}:{proxy.listen_port} -> {args.target_host}:{args.target_port}, "
              f"RTT +{args.rtt_ms} ms, {args.mbit or 'unlimited'} Mbit/s", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
