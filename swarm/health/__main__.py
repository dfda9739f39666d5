"""``python -m swarm.health --initial-peers MADDR [--port 8000]``: the swarm's health page, JSON API and metrics."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from swarm.health.app import create_app
from swarm.health.history import History
from swarm.health.monitor import Monitor
from swarm.utils.cache import cache_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a health page of a swarm: models, coverage, servers.")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm node")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP and libp2p interface (127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--refresh", type=float, default=30.0, help="seconds between refreshes of the swarm state")
    parser.add_argument("--history", default=None,
                        help="SQLite file keeping the history (default: health.sqlite3 in the cache directory)")
    parser.add_argument("--history-hours", type=float, default=6.0, help="period the page's chart shows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    history = History(args.history or cache_path("health.sqlite3"))
    monitor = Monitor(args.initial_peers, history, refresh_period=args.refresh, host=args.host)
    print(f"Health page: http://{args.host}:{args.port}/ (JSON: /api/v1/state, metrics: /metrics)", flush=True)
    uvicorn.run(create_app(monitor, args.history_hours), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
