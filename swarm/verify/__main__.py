"""``python -m swarm.verify commit MODEL [--blocks A:B]``: the weights commitment an honest server of blocks A:B
announces (swarm/trust/weights.py), computed from a local copy of the checkpoint, one block at a time."""

from __future__ import annotations

import argparse
import json

from swarm.utils.cli import entry_point, parse_blocks
from swarm.utils.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m swarm.verify", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commit = commands.add_parser("commit", help="weights commitments of a checkpoint's blocks")
    commit.add_argument("model", metavar="MODEL", help="checkpoint directory or hub name")
    commit.add_argument("--blocks", type=parse_blocks, default=None, metavar="START:END",
                        help="the span (default: every block)")
    commit.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="the dtype servers compute in (the weights are committed as served)")
    commit.add_argument("--quantization", choices=["none", "int8", "nf4"], default="none")
    commit.add_argument("--json", action="store_true",
                        help="print {span, commitment, blocks: per-block hashes} as JSON")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from swarm.blocks.weights import checkpoint_block_hashes  # torch loads once the arguments are fine
    from swarm.trust.weights import span_commitment

    blocks = range(*args.blocks) if args.blocks else None
    try:
        hashes = checkpoint_block_hashes(args.model, args.dtype, args.quantization, blocks)
    except ValueError as e:  # e.g. blocks outside the model
        raise UserError(str(e)) from None
    start = blocks.start if blocks else 0
    commitment = span_commitment(start, hashes)
    if args.json:
        print(json.dumps({"span": f"{start}:{start + len(hashes)}", "dtype": args.dtype,
                          "quantization": args.quantization, "commitment": commitment, "blocks": hashes}))
    else:
        print(commitment)


if __name__ == "__main__":
    main()
