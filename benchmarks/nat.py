"""Across emulated hosts: decode through a direct chain vs through a chain whose second hop is a server behind NAT
(reached through the bootstrap node's relay), and how long a server takes from its start to its first served
request, behind NAT and not.

Hosts (network namespaces, swarm/utils/emulated_hosts.py): ``boot`` (bootstrap node and relay), ``pub1`` (blocks
0:15), ``pub2`` (15:30, direct), ``home1`` (15:30, behind a NAT router) and ``cl`` (the client). Every host's link is
capped at ``--mbit`` each way (tbf), and every connection to a server's port or to the relay adds ``--rtt-ms`` of
round trip (a WAN proxy per port, iptables REDIRECT: these kernels have no netem), so a relayed hop crosses two such
links. SmolLM2-135M float32 (the embedded model), 16-token prompt, ``--tokens`` greedy tokens, batch 1; the client
runs in a fresh process per chain. Needs root and iptables. Prints ``direct_tokens_per_s=``,
``relayed_tokens_per_s=``, ``relayed_ratio=``, ``direct_start_to_first_request_s=`` and
``nat_start_to_first_request_s=`` on its last lines. Takes about 5 minutes on the 2-core machine.

    python benchmarks/nat.py [--runs 3] [--tokens 64] [--rtt-ms 20] [--mbit 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PORTS = {"boot": 7100, "relay": 7000, "pub1": 7200, "pub2": 7300, "home1": 7400}
RELAYED = range(7500, 7504)  # ports the relay hands out

CLIENT = r"""
import json, statistics, sys, time
import torch
from swarm import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
prompt = torch.arange(20, 36).unsqueeze(0)
print("ready", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "first":  # until a one-token generation works: seconds since the caller's start time
        while True:
            try:
                model.generate(prompt, max_new_tokens=1, do_sample=False)
                break
            except Exception:
                time.sleep(0.2)
        print(json.dumps(time.time() - command["since"]), flush=True)
    else:  # decode tokens/s after the first token, per run (the first run warms up and is left out)
        rates = []
        for _ in range(command["runs"] + 1):
            started = time.perf_counter()
            first = model.generate(prompt, max_new_tokens=1, do_sample=False)
            between = time.perf_counter()
            model.generate(prompt, max_new_tokens=command["tokens"], do_sample=False, eos_token_id=None)
            rates.append((command["tokens"] - 1) / max(time.perf_counter() - between - (between - started), 1e-9))
        print(json.dumps(rates[1:]), flush=True)
model.shutdown()
"""


class Client:
    def __init__(self, host, peers: list[str]):
        from swarm.hub.embedded import EMBEDDED_MODEL

        self.proc = host.popen([sys.executable, "-c", CLIENT, EMBEDDED_MODEL, *peers], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=None, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, command: dict):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    args = parser.parse_args()

    from swarm.utils.emulated_hosts import unavailable

    if reason := unavailable():
        sys.exit(f"cannot run: {reason}")
    # the servers' speed measurements and the unpacked model go to a cache of this run's own (hermetic)
    cache = tempfile.mkdtemp(prefix="swarm-nat-bench-")
    os.environ["SWARM_CACHE"] = cache
    try:
        measure(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def measure(args: argparse.Namespace, cache: str) -> None:
    from swarm.local_swarm import LocalSwarm
    from swarm.utils.emulated_hosts import EmulatedNetwork

    with EmulatedNetwork() as net, LocalSwarm() as swarm:
        hosts = {name: net.public_host(name) for name in ("boot", "pub1", "pub2", "cl")}
        hosts["home1"] = net.home_host("home1")
        logs = Path(swarm.directory)
        for host in hosts.values():
            host.cap(args.mbit)

        def delay(name: str, port: int) -> None:
            if args.rtt_ms <= 0:  # no proxies at all: the links' own speed
                return
            with open(logs / f"proxy-{name}-{port}.log", "w") as log:
                hosts[name].delay_inbound(port, args.rtt_ms, log)

        # Every link's delay is in place before anything connects (existing connections would keep a fast path):
        # inbound on the servers' and the bootstrap node's ports and on the ports the relay hands out, and at
        # home1's router for its connections to the relay (so the relay still sees them come from that router,
        # as its dial-back probe needs).
        for name in ("boot", "pub1", "pub2"):
            delay(name, PORTS[name])
        for port in RELAYED:
            delay("boot", port)
        with open(logs / "proxy-home1-relay.log", "w") as log:
            if args.rtt_ms > 0:
                hosts["home1"].delay_outbound(hosts["boot"].address, PORTS["relay"], args.rtt_ms, log)

        boot = swarm.start_dht("--port", str(PORTS["boot"]), "--relay-port", str(PORTS["relay"]), "--relay-ports",
                               f"{RELAYED.start}-{RELAYED.stop - 1}", on=hosts["boot"])
        swarm.start_server(None, "0:15", [boot.maddr], "--port", str(PORTS["pub1"]), on=hosts["pub1"])
        started = time.time()
        pub2 = swarm.start_server(None, "15:30", [boot.maddr], "--port", str(PORTS["pub2"]), on=hosts["pub2"],
                                  wait=False)
        client = Client(hosts["cl"], [boot.maddr])
        direct_start = client.ask({"op": "first", "since": started})
        direct = client.ask({"op": "bench", "runs": args.runs, "tokens": args.tokens})
        client.stop()
        print(f"direct chain: {[round(r, 2) for r in direct]} tokens/s; a direct server served its first "
              f"request {direct_start:.1f} s after its start", flush=True)

        pub2.stop()  # announces itself offline: blocks 15:30 only on home1 from now on
        client = Client(hosts["cl"], [boot.maddr])
        started = time.time()
        swarm.start_server(None, "15:30", [boot.maddr], "--port", str(PORTS["home1"]), on=hosts["home1"],
                           wait=False)
        nat_start = client.ask({"op": "first", "since": started})
        relayed = client.ask({"op": "bench", "runs": args.runs, "tokens": args.tokens})
        client.stop()
        print(f"relayed second hop: {[round(r, 2) for r in relayed]} tokens/s; the NATed server served its first "
              f"request {nat_start:.1f} s after its start", flush=True)

    print(f"direct_tokens_per_s={statistics.median(direct):.2f}")
    print(f"relayed_tokens_per_s={statistics.median(relayed):.2f}")
    print(f"relayed_ratio={statistics.median(relayed) / statistics.median(direct):.2f}")
    print(f"direct_start_to_first_request_s={direct_start:.1f}")
    print(f"nat_start_to_first_request_s={nat_start:.1f}")


if __name__ == "__main__":
    main()
