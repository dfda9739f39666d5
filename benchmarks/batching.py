"""Cross-session decode batching on a server: N sessions decoding at once, batching on vs off, side by side.

One server on 127.0.0.1 holds the whole model. N bare clients (sessions on one event loop, driving the inference
protocol with hidden states, so that no client-side embedding or LM head competes for the CPU) each prefill a
prompt of their own length, then send decode steps one after another, all N at the same time. "off" runs send every
step with ``"batch": false`` (the per-request opt-out) to the same server, so both modes share one process and the
same machine load; the order alternates between runs. Figures: aggregate decode tokens/s (median of the runs) and
the ratio on/off. The last line per model is ``batching_ratio_N<n>=<on/off>`` for the largest N.

Duration on a 2-core machine: about 4.5 min (measured: 277 s, defaults: the tiny model then SmolLM2). Processes: one
server per model (one at a time) with its p2pd daemon, and a client p2pd per model; all stopped when it ends, also
on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

from swarm import EMBEDDED_MODEL, resolve_model  # noqa: E402
from swarm.blocks.span import load_config  # noqa: E402
from swarm.compression import serialize_tensor  # noqa: E402
from swarm.dht.node import start_dht, stop_dht  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.rpc import protocol  # noqa: E402
from swarm.rpc.client import Stream, call  # noqa: E402
from swarm.utils.loop_thread import LoopThread  # noqa: E402

# all sessions come from one peer: lift the per-peer limits out of the measurement
SERVER_ARGS = ("--peer-rate", "100000", "--peer-burst", "100000", "--throughput", "1", "--max-sessions-per-peer", "64",
               "--max-peer-cache-share", "1")


async def decode_together(p2p, peer_id: str, blocks: int, hidden_size: int, prompts: list[int], new_tokens: int,
                          batch: bool) -> float:
    """Open one session per prompt length, prefill them, then time ``new_tokens`` decode steps of all at once."""
    streams = [await Stream.open(p2p, peer_id, protocol.INFERENCE, timeout=30) for _ in prompts]
    try:
        ids = [(await stream.request({"type": "open", "start": 0, "end": blocks,
                                      "max_length": prompt + new_tokens}, timeout=60))["session_id"]
               for stream, prompt in zip(streams, prompts, strict=True)]

        async def step(stream: Stream, session_id: str, position: int, tokens: int) -> None:
            message = {"type": "step", "session_id": session_id, "start": 0, "end": blocks, "position": position,
                       "hidden": serialize_tensor(torch.randn(1, tokens, hidden_size)),
                       "position_ids": serialize_tensor(torch.arange(position, position + tokens)[None]),
                       "batch": batch}
            reply = await stream.request(message, timeout=120)
            assert "hidden" in reply, reply

        async def decode(stream: Stream, session_id: str, prompt: int) -> None:
            for position in range(prompt, prompt + new_tokens):
                await step(stream, session_id, position, 1)

        for stream, session_id, prompt in zip(streams, ids, prompts, strict=True):
            await step(stream, session_id, 0, prompt)
        started = time.perf_counter()
        await asyncio.gather(*(decode(s, i, p) for s, i, p in zip(streams, ids, prompts, strict=True)))
        return time.perf_counter() - started
    finally:
        for stream in streams:
            stream.close()


def bench_model(name: str, model: str, clients: list[int], new_tokens: int, runs: int) -> None:
    config = load_config(resolve_model(model))
    blocks, hidden_size = config.num_hidden_layers, config.hidden_size
    prompts = [4 + 3 * i for i in range(max(clients))]
    with LocalSwarm() as swarm:
        server = swarm.start_server(model, f"0:{blocks}", [], *SERVER_ARGS)
        loop = LoopThread()
        p2p, node = loop.run(start_dht([server.maddr], host="127.0.0.1", client_mode=True))
        try:
            loop.run(decode_together(p2p, server.peer_id, blocks, hidden_size, prompts[:2], 4, True))  # warm-up
            results: dict[tuple[int, bool], list[float]] = {}
            for n in clients:
                for run in range(runs):
                    for batch in ((True, False) if run % 2 == 0 else (False, True)):
                        seconds = loop.run(decode_together(p2p, server.peer_id, blocks, hidden_size, prompts[:n],
                                                           new_tokens, batch))
                        results.setdefault((n, batch), []).append(n * new_tokens / seconds)
            served = loop.run(call(p2p, server.peer_id, protocol.INFO, {}, timeout=10))["served"]
        finally:
            loop.run(stop_dht(p2p, node))
            loop.stop()
    print(f"model={name} float32, one server (blocks 0:{blocks}) on 127.0.0.1, {new_tokens} decode steps per session "
          f"after prompts of 4..{prompts[-1]} tokens, runs={runs}, cpu count={os.cpu_count()}")
    print(f"  server info: steps={served['steps']} batched_steps={served['batched_steps']} "
          f"decode_batches={served['decode_batches']}")
    for n in clients:
        on, off = statistics.median(results[(n, True)]), statistics.median(results[(n, False)])
        runs_on = " ".join(f"{x:.0f}" for x in results[(n, True)])
        runs_off = " ".join(f"{x:.0f}" for x in results[(n, False)])
        print(f"  N={n:<3} batching on {on:8.1f} tok/s   off {off:8.1f} tok/s   ratio {on / off:5.2f}   "
              f"(runs on: {runs_on}; off: {runs_off})")
    n = max(clients)
    print(f"batching_ratio_N{n}={statistics.median(results[(n, True)]) / statistics.median(results[(n, False)]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2, or a path/name")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated numbers of concurrent sessions")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    for name in args.models.split(","):
        if name == "tiny":
            path = Path(tempfile.mkdtemp(prefix="swarm-bench-")) / "tiny-llama"
            bench_model("tiny-llama (6 layers, hidden 64)", str(save_tiny_model("llama", path)), clients,
                        args.new_tokens, args.runs)
        elif name == "smollm2":
            bench_model(EMBEDDED_MODEL, EMBEDDED_MODEL, clients, args.new_tokens, args.runs)
        else:
            bench_model(name, name, clients, args.new_tokens, args.runs)


if __name__ == "__main__":
    main()
