"""``python -m swarm.dht``: a bootstrap-only DHT node that prints the multiaddrs others join with."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from swarm.dht.identity import Identity
from swarm.dht.node import start_dht, stop_dht, visible_maddrs


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a bootstrap DHT node for a swarm.")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of an existing swarm to join")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--identity", default=None, help="private key file, for a stable peer id across restarts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(args.identity) if args.identity else None
    p2p, node = await start_dht(args.initial_peers, host=args.host, port=args.port, identity=identity)
    maddrs = await visible_maddrs(p2p)
    print("DHT node ready. Join this swarm with:", flush=True)
    for maddr in maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_dht(p2p, node)


if __name__ == "__main__":
    main()
