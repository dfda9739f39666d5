"""``python -m swarm.dht`` (or ``swarm-dht``): a bootstrap-only DHT node that prints the multiaddrs others join with.

Arguments are parsed before hivemind is imported, so ``--help`` and argument mistakes answer at once.
"""

from __future__ import annotations

import argparse

from swarm.utils.cli import Parser, entry_point, host, port, setup_logging
from swarm.utils.ports import check_can_listen

RELAY_ANNOUNCE_PERIOD = 30.0  # s between announcements of the relay in the DHT


def port_range(text: str) -> range:
    first, _, last = text.partition("-")
    try:
        ports = range(port(first), port(last) + 1)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST (e.g. 7500-7599), got {text!r}") from None
    if not ports or ports.start == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range")
    return ports


def build_parser() -> Parser:
    parser = Parser("swarm.dht", "Run a bootstrap DHT node for a swarm.", initial_peers=True)
    network = parser.add_argument_group("swarm and network")
    parser.add_initial_peers(network, required=False, help="multiaddrs of an existing swarm to join (none: a new one)")
    network.add_argument("--host", type=host, default="0.0.0.0",
                         help="interface to listen on (127.0.0.1: loopback only)")
    network.add_argument("--port", type=port, default=0, help="TCP port (0: any free port)")
    network.add_argument("--relay", action=argparse.BooleanOptionalAction, default=None,
                         help="relay connections for servers behind NAT (default: on, unless on loopback)")
    network.add_argument("--relay-port", type=port, default=0, help="TCP port of that relay (0: any free port)")
    network.add_argument("--relay-ports", type=port_range, default=None, metavar="FIRST-LAST",
                         help="ports the relay hands to servers behind NAT (default: any free port)")
    network.add_argument("--identity", default=None, metavar="KEYFILE",
                         help="private key file, for a stable peer id across restarts (created if missing)")
    parser.add_alias("--identity_path", "--identity")  # Petals' name
    return parser


@entry_point
def main() -> None:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    check_can_listen(args.host, args.port)  # before hivemind loads; start_dht checks it again
    import asyncio

    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    import asyncio
    import signal
    from contextlib import suppress

    from swarm.dht.identity import Identity
    from swarm.dht.node import is_loopback, public_host, start_dht, stop_dht, visible_maddrs
    from swarm.dht.relay import RelayService, announce_relay

    relay = not is_loopback(args.host) if args.relay is None else args.relay
    # a relay announces itself in signed records: it needs a key (kept in memory without --identity)
    identity = Identity.load_or_create(args.identity) if args.identity or relay else None
    p2p, node = await start_dht(args.initial_peers, host=args.host, port=args.port, identity=identity)
    maddrs = await visible_maddrs(p2p)
    service = None
    if relay and (public := public_host(args.host, maddrs)) is not None:
        service = RelayService(args.host, args.relay_port, public_host=public, ports=args.relay_ports)
        await service.start()
        print(f"Relaying for servers behind NAT at {public}:{service.port}", flush=True)
    print("DHT node ready. Join this swarm with:", flush=True)
    for maddr in maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if service is not None:
            with suppress(Exception):
                await announce_relay(node, service.public_host, service.port, expiration=RELAY_ANNOUNCE_PERIOD * 2.5)
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RELAY_ANNOUNCE_PERIOD)
    if service is not None:
        await service.stop()
    await stop_dht(p2p, node)


if __name__ == "__main__":
    main()
