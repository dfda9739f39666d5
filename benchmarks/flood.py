"""A compute flood against one server: two peers send long forward passes as fast as the server takes them while an
honest client generates; prints how much slower the honest generation gets.

Setting (issue 20, item 7): a tiny random Llama (6 blocks, hidden 64, float32) on one server; each flooder keeps
``--concurrency`` FORWARD requests of ``--flood-tokens`` tokens in flight, from its own identity (its own process);
the honest client generates ``--new-tokens`` greedy tokens, ``--runs`` times alone and ``--runs`` times under the
flood, in fresh sessions. Last lines: ``alone_s=``, ``flooded_s=``, ``slowdown=`` (medians), then what the server
did with the flood (requests served, refused by cost or by rate).

Processes: a bootstrap node, the server, two flooders, each with its p2pd daemon; all stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402


def save_tiny_llama(directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, vocab_size=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


async def flood(peers: list[str], server: str, tokens: int, concurrency: int, seconds: float) -> None:
    """Keep ``concurrency`` forward passes of ``tokens`` positions in flight for ``seconds``; print the outcomes."""
    from swarm.compression import serialize_tensor
    from swarm.dht.node import start_dht, stop_dht
    from swarm.rpc import protocol
    from swarm.rpc.client import RemoteError, call

    p2p, node = await start_dht(peers, host="127.0.0.1", client_mode=True)
    message = {"start": 0, "end": 6, "hidden": serialize_tensor(torch.randn(1, tokens, 64)),
               "position_ids": serialize_tensor(torch.arange(tokens)[None])}
    counts = {"served": 0, "busy": 0, "refused": 0}
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                await call(p2p, server, protocol.FORWARD, message, timeout=120)
                counts["served"] += 1
            except RemoteError as e:
                counts["busy" if e.busy else "refused"] += 1
                await asyncio.sleep(0.01)  # a refusal costs the flooder nothing: keep it from spinning

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(f"flooder: {counts}", flush=True)
    await stop_dht(p2p, node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--flood-tokens", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--flooder", nargs=3, metavar=("PEERS", "SERVER", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flooder:
        peers, server, seconds = args.flooder
        asyncio.run(flood(peers.split(","), server, args.flood_tokens, args.concurrency, float(seconds)))
        return

    scratch = tempfile.TemporaryDirectory(prefix="swarm-flood-")  # the model, and the servers' cache: nothing kept
    os.environ["SWARM_CACHE"] = scratch.name
    path = save_tiny_llama(Path(scratch.name) / "tiny-llama")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with scratch, LocalSwarm() as launcher:
        peers = [launcher.start_dht().maddr]
        server = launcher.start_server(path, "0:6", peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, compression="none")

        def generation_seconds() -> float:
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
            return time.perf_counter() - started

        generation_seconds()  # warm-up
        alone = [generation_seconds() for _ in range(args.runs)]
        seconds = 15 + 3 * args.runs
        flooders = [subprocess.Popen([sys.executable, __file__, "--flood-tokens", str(args.flood_tokens),
                                      "--concurrency", str(args.concurrency), "--flooder", ",".join(peers),
                                      server.peer_id, str(seconds)]) for _ in range(2)]
        try:
            time.sleep(8)  # the flooders join and fill the server's queue
            flooded = [generation_seconds() for _ in range(args.runs)]
        finally:
            for process in flooders:
                process.wait(seconds + 120)
        info = model.get_remote().manager.loop.run(_info(model, server.peer_id))
        model.shutdown()
    print(f"alone: {[round(s, 3) for s in alone]}  flooded: {[round(s, 3) for s in flooded]}")
    print(f"server: served {info['served']}")
    alone_s, flooded_s = statistics.median(alone), statistics.median(flooded)
    print(f"alone_s={alone_s:.3f}")
    print(f"flooded_s={flooded_s:.3f}")
    print(f"slowdown={flooded_s / alone_s:.2f}")


async def _info(model, peer: str) -> dict:
    from swarm.rpc import protocol
    from swarm.rpc.client import call

    return await call(model.get_remote().manager.p2p, peer, protocol.INFO, {}, timeout=30)


if __name__ == "__main__":
    main()
