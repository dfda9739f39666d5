"""Decode step time with server-to-server push vs client relay, through WAN-like links (every server behind a
proxy adding the same RTT to all its traffic), SmolLM2-135M float32 over three servers.

With client relay a step costs a client round trip per server (3 RTTs here); with push it costs one pass along the
chain, client -> S1 -> S2 -> S3 -> client (4 one-way trips: 2 RTTs).

Duration on a 2-core machine: 65 s (measured, defaults). Processes: a bootstrap node, three WAN proxies and three
servers, each node with its p2pd daemon, and a client p2pd per mode (two, one at a time); all stopped when it ends,
also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from generation import measure  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM  # noqa: E402
from swarm.local_swarm import LocalSwarm, free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ids = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    with LocalSwarm() as swarm:
        bootstrap = swarm.start_dht()
        for blocks in ("0:10", "10:20", "20:30"):
            server_port, proxy_port = free_port(), free_port()
            swarm.start_wan_proxy(server_port, proxy_port, args.rtt_ms, None)
            swarm.start_server(None, blocks, [bootstrap.maddr], "--port", str(server_port), "--announce-maddrs",
                               f"/ip4/127.0.0.1/tcp/{proxy_port}")
        step_ms = {}
        for push in (False, True):
            model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[bootstrap.maddr],
                                                                    push=push)
            try:
                measure(model, ids[:, :8], 2)  # warm-up: connections through the proxies
                decode = statistics.median(measure(model, ids, args.decode_tokens)[1] for _ in range(args.runs))
            finally:
                model.shutdown()
            step_ms[push] = 1000 / decode
            print(f"{'push' if push else 'client relay':>12}: {step_ms[push]:.0f} ms per decode step "
                  f"({decode:.2f} tokens/s)", flush=True)
    print(f"3 servers, {args.rtt_ms:.0f} ms RTT on every link: push saves "
          f"{step_ms[False] - step_ms[True]:.0f} ms per step ({step_ms[False] / step_ms[True]:.2f}x faster decoding)")


if __name__ == "__main__":
    main()
