"""``python -m swarm.server [MODEL] --blocks START:END``: serve a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from swarm.blocks.quantization import QUANTIZATIONS
from swarm.server.admission import PeerLimits
from swarm.server.handler import Limits
from swarm.server.server import DTYPES, Server, ServerConfig
from swarm.settlement.plugin import available_backends, parse_options


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


def parse_throughput(text: str) -> str | float:
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "auto", "eval" or a positive number, got {text!r}') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"throughput must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve a span of a model's blocks to the swarm.")
    parser.add_argument("model", nargs="?", default=None,
                        help="local directory or hub name (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=parse_blocks, help="START:END, the blocks to serve")
    which.add_argument("--num-blocks", type=int, help="serve N blocks where the swarm needs them most (rebalanced)")
    parser.add_argument("--balance-period", type=float, default=120.0,
                        help="mean seconds between checks whether moving would help the swarm (with --num-blocks)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of the swarm (none: a new swarm)")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--announce-maddrs", nargs="*", default=None,
                        help="multiaddrs to announce instead of the listening ones (NAT, proxies)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype of the blocks")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="weight quantization of the blocks' linear layers (bitsandbytes int8 / nf4)")
    parser.add_argument("--cache-tokens", type=int, default=16384,
                        help="KV cache budget: batch x positions that sessions may hold at once over the span")
    parser.add_argument("--public-name", default=None, help="a name shown to others (e.g. on the health page)")
    parser.add_argument("--model-id", default=None,
                        help="name announced in the DHT (default: the hub name or the local directory's name)")
    parser.add_argument("--update-period", type=float, default=30.0, help="seconds between DHT announcements")
    parser.add_argument("--throughput", type=parse_throughput, default="auto",
                        help='"auto" (measure once, cache on disk), "eval" (measure again) or a number used as '
                             "both decode steps/s and forward tokens/s")
    parser.add_argument("--acceleration-history", default=None,
                        help="acceleration history (JSONL dataset or SQLite) whose summary is announced in the DHT")
    parser.add_argument("--identity", default=None, help="private key file, for a stable peer id across restarts")
    parser.add_argument("--max-session-length", type=int, default=8192, help="longest inference session accepted")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="batch x new tokens per request")
    parser.add_argument("--max-message-mb", type=float, default=256, help="largest request accepted, in MiB")
    parser.add_argument("--session-timeout", type=float, default=300, help="close sessions idle this many seconds")
    parser.add_argument("--batch-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="run decode steps of several sessions that wait at the same time as one call")
    parser.add_argument("--max-decode-batch", type=int, default=Limits.max_decode_batch,
                        help="batch rows of such a call")
    peers = PeerLimits()
    parser.add_argument("--max-sessions-per-peer", type=int, default=peers.max_sessions_per_peer,
                        help="inference sessions one peer may hold open at once")
    parser.add_argument("--max-sessions", type=int, default=peers.max_sessions,
                        help="inference sessions open at once, all peers together")
    parser.add_argument("--max-session-batch", type=int, default=peers.max_session_batch,
                        help="batch rows of one inference session")
    parser.add_argument("--max-peer-cache-share", type=float, default=peers.max_peer_cache_share,
                        help="fraction of --cache-tokens one peer's open sessions may reserve together "
                             "(batch x max_length)")
    parser.add_argument("--peer-rate", type=float, default=peers.rate,
                        help="requests per second one peer may sustain (stream opens, steps, links)")
    parser.add_argument("--peer-burst", type=int, default=peers.burst,
                        help="requests one peer may send at once after being idle")
    parser.add_argument("--settlement", default=None, metavar="NAME",
                        help="issue signed usage receipts and settle them with this backend (installed: "
                             f"{', '.join(sorted(available_backends())) or 'none'}); default: off")
    parser.add_argument("--settlement-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option, repeatable (ledger: path; evm: rpc_url, contract, private_key)")
    parser.add_argument("--price", type=int, default=1,
                        help="price per token (batch row x position) in the backend's smallest unit (evm: wei)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=os.environ.get("SWARM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    peers = PeerLimits(max_sessions_per_peer=args.max_sessions_per_peer, max_sessions=args.max_sessions,
                       max_session_batch=args.max_session_batch, max_peer_cache_share=args.max_peer_cache_share,
                       rate=args.peer_rate, burst=args.peer_burst)
    limits = Limits(max_message_bytes=int(args.max_message_mb * 1024**2), max_batch_tokens=args.max_batch_tokens,
                    max_session_length=args.max_session_length, session_timeout=args.session_timeout, peers=peers,
                    batch_decode=args.batch_decode, max_decode_batch=args.max_decode_batch)
    config = ServerConfig(
        model=args.model, start=args.blocks[0] if args.blocks else None, end=args.blocks[1] if args.blocks else None,
        num_blocks=args.num_blocks, balance_period=args.balance_period, initial_peers=args.initial_peers,
        host=args.host, port=args.port, announce_maddrs=args.announce_maddrs, device=args.device,
        dtype=args.dtype, quantization=args.quantize, cache_tokens=args.cache_tokens,
        public_name=args.public_name, model_id=args.model_id, update_period=args.update_period,
        identity_path=args.identity, acceleration_history=args.acceleration_history, throughput=args.throughput,
        limits=limits,
        settlement=args.settlement, settlement_options=parse_options(args.settlement_option), price=args.price,
    )
    asyncio.run(Server(config).run())


if __name__ == "__main__":
    main()
