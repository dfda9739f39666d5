"""``python -m swarm.health --initial-peers MADDR [--port 8000]`` (or ``swarm-health``): the swarm's health page,
JSON API and metrics.

Arguments are parsed before uvicorn and hivemind are imported, so ``--help`` and argument mistakes answer at once.
"""

from __future__ import annotations

import json

from swarm.utils.cli import Parser, entry_point, host, port, positive, setup_logging
from swarm.utils.errors import UserError


def build_parser() -> Parser:
    parser = Parser("swarm.health", "Serve a health page of a swarm: models, coverage, servers.", initial_peers=True)
    network = parser.add_argument_group("swarm and network")
    parser.add_initial_peers(network, required=True)
    network.add_argument("--host", type=host, default="127.0.0.1",
                         help="HTTP and libp2p interface (127.0.0.1: loopback only)")
    network.add_argument("--port", type=port, default=8000, help="HTTP port")
    page = parser.add_argument_group("page")
    page.add_argument("--refresh", type=positive(float), default=30.0, metavar="SECONDS",
                      help="seconds between refreshes of the swarm state")
    page.add_argument("--history", default=None, metavar="FILE",
                      help="SQLite file keeping the history (default: health.sqlite3 in the cache directory)")
    page.add_argument("--reference-weights", action="append", default=[], metavar="MODEL_ID=FILE",
                      help="the model's published weights: what `python -m swarm.verify commit MODEL --json` printed "
                           "(one file per dtype/quantization; repeatable); servers are shown matching or not")
    page.add_argument("--history-hours", type=positive(float), default=6.0, metavar="HOURS",
                      help="period the page's chart shows")
    return parser


def read_references(options: list[str]) -> dict:
    """``MODEL_ID=FILE`` options -> model id -> ``ReferenceWeights``; a bad one is a ``UserError``."""
    from swarm.trust.weights import ReferenceWeights

    documents: dict[str, list] = {}
    for option in options:
        model_id, _, path = option.partition("=")
        try:
            with open(path) as file:
                documents.setdefault(model_id, []).append(json.load(file))
        except (OSError, ValueError) as e:
            raise UserError(f"--reference-weights {option}: expected MODEL_ID=FILE of JSON ({e})") from None
    try:
        return {model_id: ReferenceWeights.from_published(found) for model_id, found in documents.items()}
    except ValueError as e:
        raise UserError(f"--reference-weights: {e}") from None


@entry_point
def main() -> None:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    references = read_references(args.reference_weights)

    import uvicorn

    from swarm.health.app import create_app
    from swarm.health.history import History
    from swarm.health.monitor import Monitor
    from swarm.utils.cache import cache_path

    history = History(args.history or cache_path("health.sqlite3"))
    monitor = Monitor(args.initial_peers, history, refresh_period=args.refresh, host=args.host,
                      references=references)
    print(f"Health page: http://{args.host}:{args.port}/ (JSON: /api/v1/state, metrics: /metrics)", flush=True)
    uvicorn.run(create_app(monitor, args.history_hours), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
