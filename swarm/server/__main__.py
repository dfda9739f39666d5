"""``python -m swarm.server [MODEL] --blocks START:END`` (or ``swarm-server``): serve a span of a model's blocks to
the swarm.

Arguments are parsed before torch and hivemind are imported, so ``--help`` and argument mistakes answer at once.
"""

from __future__ import annotations

import argparse
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from swarm.hub.source import check_model_name
from swarm.server.admission import PeerLimits
from swarm.utils.cli import Parser, entry_point, host, parse_blocks, port, positive, setup_logging
from swarm.utils.ports import check_can_listen

if TYPE_CHECKING:
    from swarm.server.server import ServerConfig

# The names the server accepts, spelled out here so that parsing needs no torch (tests/test_cli.py checks them
# against swarm.blocks.weights.DTYPES, swarm.blocks.quantization.QUANTIZATIONS and the handler's Limits).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
QUANTIZATION_NAMES = ("none", "int8", "nf4")
MAX_DECODE_BATCH = 32


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


def build_parser() -> Parser:
    parser = Parser("swarm.server", "Serve a span of a model's blocks to the swarm.", initial_peers=True)
    parser.add_model()
    # Petals' names for the same options (its other options are accepted with underscores automatically)
    for alias, option in (("--block_indices", "--blocks"), ("--torch_dtype", "--dtype"), ("--quant_type", "--quantize"),
                          ("--identity_path", "--identity"), ("--attn_cache_tokens", "--cache-tokens"),
                          ("--mean_balance_check_period", "--balance-period")):
        parser.add_alias(alias, option)

    blocks = parser.add_argument_group("blocks (one of --blocks and --num-blocks)")
    which = blocks.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=parse_blocks, metavar="START:END", help="the blocks to serve")
    which.add_argument("--num-blocks", type=positive(int), metavar="N",
                       help="serve N blocks where the swarm needs them most (rebalanced)")
    blocks.add_argument("--balance-period", type=positive(float), default=120.0, metavar="SECONDS",
                        help="mean seconds between checks whether moving would help the swarm (with --num-blocks)")

    network = parser.add_argument_group("swarm and network")
    parser.add_initial_peers(network, required=False, help="multiaddrs of the swarm to join (none: a new swarm)")
    network.add_argument("--host", type=host, default="0.0.0.0",
                         help="interface to listen on (127.0.0.1: loopback only)")
    network.add_argument("--port", type=port, default=0, help="TCP port (0: any free port)")
    parser.add_maddrs(network, "--announce-maddrs",
                      help="multiaddrs to announce instead of the listening ones (port forwarding, proxies)")
    network.add_argument("--reachability", choices=("auto", "direct", "relay"), default="auto",
                         help="auto: ask a relay to dial this server back and serve through a relay if it cannot "
                              "(behind NAT); direct: never use a relay; relay: always")
    network.add_argument("--relay", action=argparse.BooleanOptionalAction, default=False,
                         help="relay connections for servers behind NAT (for a server others can reach directly)")
    network.add_argument("--relay-port", type=port, default=0, help="TCP port of that relay (0: any free port)")
    network.add_argument("--identity", default=None, metavar="KEYFILE",
                         help="private key file, for a stable peer id across restarts (created if missing)")
    network.add_argument("--public-name", default=None, help="a name shown to others (e.g. on the health page)")
    network.add_argument("--model-id", default=None,
                         help="name announced in the DHT (default: the hub name or the local directory's name)")
    network.add_argument("--update-period", type=positive(float), default=30.0, metavar="SECONDS",
                         help="seconds between DHT announcements")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    compute.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype of the blocks")
    compute.add_argument("--quantize", choices=QUANTIZATION_NAMES, default="none",
                         help="weight quantization of the blocks' linear layers (bitsandbytes int8 / nf4)")
    compute.add_argument("--adapters", nargs="+", default=[], metavar="NAME_OR_PATH",
                         help="LoRA adapters to serve beside the blocks: a directory (named after itself), a hub "
                              "name, or NAME=PATH. Transformer blocks: peft adapters, chosen per request with "
                              "active_adapter=NAME; U-Net levels: diffusers LoRAs (a directory from save_lora_weights "
                              "or a .safetensors file), chosen with pipe.set_adapters(NAME)")
    compute.add_argument("--cache-tokens", type=positive(int), default=16384, metavar="N",
                         help="KV cache budget: batch x positions that sessions may hold at once over the span")
    compute.add_argument("--throughput", type=parse_throughput, default="auto",
                         help='"auto" (measure once, cache on disk), "eval" (measure again) or a number used as '
                              "both decode steps/s and forward tokens/s")
    compute.add_argument("--batch-decode", action=argparse.BooleanOptionalAction, default=True,
                         help="run decode steps of several sessions that wait at the same time as one call")
    compute.add_argument("--max-decode-batch", type=positive(int), default=MAX_DECODE_BATCH, metavar="N",
                         help="batch rows of such a call")
    compute.add_argument("--acceleration-history", default=None, metavar="FILE",
                         help="acceleration history (JSONL dataset or SQLite) whose summary is announced in the DHT")

    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-session-length", type=positive(int), default=8192, metavar="TOKENS",
                        help="longest inference session accepted")
    limits.add_argument("--max-batch-tokens", type=positive(int), default=8192, metavar="TOKENS",
                        help="batch x new tokens per request")
    limits.add_argument("--max-message-mb", type=positive(float), default=256, metavar="MIB",
                        help="largest request accepted, in MiB")
    limits.add_argument("--session-timeout", type=positive(float), default=300, metavar="SECONDS",
                        help="close sessions idle this many seconds")
    limits.add_argument("--open-timeout", type=positive(float), default=30, metavar="SECONDS",
                        help="a stream must send its first message within this")
    limits.add_argument("--max-request-seconds", type=positive(float), default=120, metavar="SECONDS",
                        help="refuse a request whose predicted compute time (at this server's measured speed) is "
                             "longer; long work is computed in pieces, fairly shared between peers")
    limits.add_argument("--max-attention-tokens", type=positive(int), default=128 * 128, metavar="N",
                        help="U-Net servers: positions one image may attend over at a level (its cost is the square)")
    limits.add_argument("--max-encoder-tokens", type=positive(int), default=4096, metavar="N",
                        help="U-Net servers: cross-attention tokens per row (text, image embeddings)")
    limits.add_argument("--max-diffusion-sessions", type=positive(int), default=16, metavar="N",
                        help="U-Net servers: session memory is this many generations at the model's own size")
    peers = PeerLimits()
    limits.add_argument("--max-sessions-per-peer", type=positive(int), default=peers.max_sessions_per_peer,
                        metavar="N", help="inference sessions one peer may hold open at once")
    limits.add_argument("--max-sessions", type=positive(int), default=peers.max_sessions, metavar="N",
                        help="inference sessions open at once, all peers together")
    limits.add_argument("--max-session-batch", type=positive(int), default=peers.max_session_batch, metavar="N",
                        help="batch rows of one inference session")
    limits.add_argument("--reclaim-idle-after", type=positive(float), default=peers.reclaim_idle_after,
                        metavar="SECONDS", help="a session without a step for this long gives its memory back when a "
                                                "new session does not fit (the biggest holder's first)")
    limits.add_argument("--max-peer-cache-share", type=positive(float), default=peers.max_peer_cache_share,
                        metavar="FRACTION", help="fraction of --cache-tokens one peer's open sessions may reserve "
                                                 "together (batch x max_length), once it has earned it")
    limits.add_argument("--new-peer-cache-share", type=positive(float), default=peers.new_peer_cache_share,
                        metavar="FRACTION", help="the same for a peer new to this server; it grows with the "
                                                 "positions computed for the peer, up to --max-peer-cache-share")
    limits.add_argument("--max-peer-queue-seconds", type=positive(float), default=peers.max_queued_seconds,
                        metavar="SECONDS", help="predicted compute one peer's requests may have queued at once; "
                                                "beyond it, its requests are refused as busy")
    limits.add_argument("--peer-rate", type=positive(float), default=peers.rate, metavar="PER_SECOND",
                        help="requests per second one peer may sustain (stream opens, steps, links)")
    limits.add_argument("--peer-burst", type=positive(int), default=peers.burst, metavar="N",
                        help="requests one peer may send at once after being idle")

    zk = parser.add_argument_group("zero-knowledge proofs (off unless --zk is given; needs pip install swarm[zk])")
    zk.add_argument("--zk", default=None, metavar="DIR",
                    help="prove challenged forward requests (ezkl); circuits and keys are made and kept in DIR")
    zk.add_argument("--zk-srs", default=None, metavar="DIR",
                    help="where the structured reference strings are (kzg-ROWS.srs, e.g. from a public ceremony; "
                         "made there if missing); the verifying clients must use the same ones (default: --zk DIR)")
    zk.add_argument("--zk-max-positions", type=positive(int), default=8, metavar="N",
                    help="prove sequences of at most N positions (a circuit's size grows with them)")
    settlement = parser.add_argument_group("settlement (off unless --settlement is given)")
    installed = sorted(ep.name for ep in entry_points(group="swarm.settlement"))
    settlement.add_argument("--settlement", default=None, metavar="NAME",
                            help=f"issue signed usage receipts and settle them with this backend (installed: "
                                 f"{', '.join(installed) or 'none'})")
    settlement.add_argument("--settlement-option", action="append", default=[], metavar="KEY=VALUE",
                            help="a backend option, repeatable (ledger: path; evm: rpc_url, contract, private_key)")
    settlement.add_argument("--price", type=int, default=1,
                            help="price per token (batch row x position) in the backend's smallest unit (evm: wei)")
    settlement.add_argument("--settlement-period", type=positive(float), default=1.0, metavar="SECONDS",
                            help="seconds between settlement batches (receipts wait in a journal meanwhile)")
    settlement.add_argument("--require-payment", action="store_true",
                            help="refuse sessions of clients that do not settle, and steps of a session whose client "
                                 "stopped countersigning receipts")
    return parser


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from parsed arguments (imports torch)."""
    from swarm.server.handler import Limits
    from swarm.server.server import ServerConfig
    from swarm.settlement.plugin import parse_options

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    peers = PeerLimits(max_sessions_per_peer=args.max_sessions_per_peer, max_sessions=args.max_sessions,
                       max_session_batch=args.max_session_batch, max_peer_cache_share=args.max_peer_cache_share,
                       rate=args.peer_rate, burst=args.peer_burst, reclaim_idle_after=args.reclaim_idle_after,
                       max_queued_seconds=args.max_peer_queue_seconds,
                       new_peer_cache_share=args.new_peer_cache_share)
    limits = Limits(max_message_bytes=int(args.max_message_mb * 1024**2), max_batch_tokens=args.max_batch_tokens,
                    max_session_length=args.max_session_length, session_timeout=args.session_timeout, peers=peers,
                    batch_decode=args.batch_decode, max_decode_batch=args.max_decode_batch,
                    open_timeout=args.open_timeout, max_request_seconds=args.max_request_seconds,
                    max_attention_tokens=args.max_attention_tokens, max_encoder_tokens=args.max_encoder_tokens,
                    max_diffusion_sessions=args.max_diffusion_sessions)
    announcers = []
    if args.acceleration_history:  # the operator's collected history, summarized for new clients to learn from
        from swarm.acceleration.summaries import HistoryAnnouncer

        announcers.append(HistoryAnnouncer(args.acceleration_history))
    return ServerConfig(
        model=args.model, start=args.blocks[0] if args.blocks else None, end=args.blocks[1] if args.blocks else None,
        num_blocks=args.num_blocks, balance_period=args.balance_period, initial_peers=args.initial_peers,
        host=args.host, port=args.port, announce_maddrs=args.announce_maddrs, reachability=args.reachability,
        relay=args.relay, relay_port=args.relay_port, device=args.device,
        dtype=args.dtype, quantization=args.quantize, adapters=args.adapters, cache_tokens=args.cache_tokens,
        public_name=args.public_name, model_id=args.model_id, update_period=args.update_period,
        identity_path=args.identity, announcers=announcers, throughput=args.throughput,
        limits=limits,
        settlement=args.settlement, settlement_options=parse_options(args.settlement_option), price=args.price,
        require_payment=args.require_payment, settlement_period=args.settlement_period,
        zk=args.zk, zk_srs=args.zk_srs, zk_max_positions=args.zk_max_positions,
    )


@entry_point
def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.require_payment and not args.settlement:
        parser.error("--require-payment needs --settlement NAME: without settlement nobody could pay")
    if args.zk and (args.dtype != "float32" or args.quantize != "none"):
        parser.error("--zk proves float32 blocks without quantization: drop --dtype/--quantize or --zk")
    setup_logging(args.log_level)
    check_model_name(args.model)  # mistakes fail now, not after torch has loaded; start_dht checks the port again
    for spec in args.adapters:
        where = spec.partition("=")[2] or spec
        if not where.endswith(".safetensors"):
            check_model_name(where)
        elif not os.path.isfile(os.path.expanduser(where)):  # a diffusers LoRA may be one file
            parser.error(f"--adapters: no such file: {where}")
    check_can_listen(args.host, args.port)

    import asyncio  # the heavy part starts here, once the arguments are known to be good

    from swarm.server.server import Server

    asyncio.run(Server(build_config(args)).run())


if __name__ == "__main__":
    main()
