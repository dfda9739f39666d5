"""Collect a real acceleration history: every method on a grid of tasks, through real servers on this machine.

For each model (a small random Llama and the embedded SmolLM2-135M) it starts six servers on 127.0.0.1: two
halves of the model in float32, two in int8 and two in nf4, each behind a WAN proxy (swarm.utils.wan_proxy). For
each network condition (the proxies' RTT and bandwidth), each task (batch, prompt length, generated length) and
each method of swarm.acceleration.METHODS it generates greedily, measures time to first token, decode speed, bytes
on the wire and greedy agreement with the exact method, and appends a record to the dataset. The task features
(RTT, bandwidth) are measured with the same probes the client uses when it chooses a method.

    python benchmarks/collect_acceleration_history.py --out benchmarks/data/acceleration_history.jsonl

Duration on a 2-core machine: about an hour (estimated: --quick took 137 s, measured, and the full grid has twelve
times its tasks, most of them behind slower links). Processes, per model: a bootstrap node and six servers, each
with its p2pd daemon, six WAN proxies per network condition (six at a time), and the client's p2pd; all stopped when
it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.acceleration import METHODS, Outcome, Record, configure, probe_chain, task_features  # noqa: E402
from swarm.local_swarm import LocalSwarm, free_port  # noqa: E402
from swarm.rpc.framing import TRAFFIC  # noqa: E402
from swarm.utils.cache import cache_root  # noqa: E402

NETWORKS = [("lan", 0.0, None), ("wan-fast", 20.0, 100.0), ("wan-slow", 80.0, 5.0)]  # (name, RTT ms, Mbit/s)
TASKS = list(itertools.product([1, 3], [16, 128], [4, 24]))  # (batch, prompt length, new tokens)
QUANTIZATIONS = ["none", "int8", "nf4"]


class Clock(BaseStreamer):
    """Times of the prompt and of each generated token, as generate() hands them over."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def small_model(directory: Path) -> Path:
    """A random-weight Llama of 8 blocks, 256 wide (a few million parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024)
        LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def run(model, method, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, Outcome]:
    clock = Clock()
    traffic = sum(TRAFFIC.values())
    config = configure(model.get_remote().client_config, method)  # this request's settings only
    with model.inference_session(ids.shape[1] + new_tokens, config):
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, attention_mask=torch.ones_like(ids))
        finished = time.perf_counter()
    first = clock.times[1] if len(clock.times) > 1 else finished
    return out[:, ids.shape[1]:], Outcome.timed(started, first, finished, ids.shape[0], new_tokens,
                                                sum(TRAFFIC.values()) - traffic)


def agreement(tokens: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over rows of the fraction of tokens generated before the first one that differs from the exact path."""
    fractions = []
    for row, ref in zip(tokens, exact, strict=True):
        differs = (row != ref).nonzero()
        fractions.append((int(differs[0]) if len(differs) else len(ref)) / len(ref))
    return sum(fractions) / len(fractions)


def collect(name: str, model_path: str | None, out: Path, work: Path, networks: list, tasks: list) -> int:
    records = 0
    with LocalSwarm(work / f"logs-{name}") as swarm:
        bootstrap = swarm.start_dht()
        num_blocks = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"] \
            if model_path else 30
        half = num_blocks // 2
        ports = []
        for quantization in QUANTIZATIONS:
            for blocks in (f"0:{half}", f"{half}:{num_blocks}"):
                server_port, proxy_port = free_port(), free_port()
                extra = ["--quantize", quantization] if quantization != "none" else []
                swarm.start_server(model_path, blocks, [bootstrap.maddr], "--port", str(server_port),
                                   "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{proxy_port}", *extra, wait=False)
                ports.append((server_port, proxy_port))
        servers = swarm.processes[1:]
        # The first network's proxies go up before anyone dials the servers' announced (proxy) addresses: a dial
        # that finds nothing there puts the address in libp2p's dial backoff, and the next probe fails at once.
        proxies = [swarm.start_wan_proxy(server, proxy, *networks[0][1:]) for server, proxy in ports]
        for process in servers:
            process.wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[bootstrap.maddr],
                                                                verify_probability=0.0)
        vocab = model.config.vocab_size
        try:
            for index, (network, rtt, mbit) in enumerate(networks):
                if index:
                    proxies = [swarm.start_wan_proxy(server, proxy, rtt, mbit) for server, proxy in ports]
                float_chain = [p.peer_id for p in servers[:2]]
                link = model.get_remote().manager.loop.run(probe_chain(model.get_remote().manager.p2p, float_chain))
                for method in METHODS.values():  # warm-up: pings, local spans, first 8-bit calls
                    run(model, method, torch.randint(3, vocab, (1, 8)), 2)
                for batch, prompt, new_tokens in tasks:
                    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
                    features = task_features(model, batch, prompt, new_tokens, float_chain, link)
                    task = hashlib.sha1(f"{name}|{network}|{batch}|{prompt}|{new_tokens}".encode()).hexdigest()[:12]
                    exact = None
                    for method in METHODS.values():
                        tokens, outcome = run(model, method, ids, new_tokens)
                        if exact is None:
                            exact = tokens  # the "exact" method comes first
                        outcome = Outcome(**{**outcome.__dict__, "quality": agreement(tokens, exact)})
                        record = Record(task=task, features=features, method=method.name, outcome=outcome,
                                        source="collected", model=name, time=time.time())
                        with out.open("a") as f:
                            f.write(record.to_json() + "\n")
                        records += 1
                        print(f"{name} {network} b{batch} p{prompt} n{new_tokens} {method.name:>16}: "
                              f"total {outcome.total_s:.2f} s, ttft {outcome.ttft_s:.2f} s, "
                              f"{outcome.tokens_per_s:.1f} tok/s, {outcome.bytes} B, quality {outcome.quality:.2f}",
                              flush=True)
                for proxy in proxies:
                    proxy.stop()
        finally:
            model.shutdown()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "acceleration_history.jsonl")
    parser.add_argument("--work", type=Path, default=cache_root() / "bench" / "acceleration",
                        help="the small model and the servers' logs (default: under $SWARM_CACHE)")
    parser.add_argument("--models", nargs="*", default=["small", "smollm2"])
    parser.add_argument("--quick", action="store_true", help="one network, two tasks (a smoke run)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    networks, tasks = (NETWORKS[:1], TASKS[:2]) if args.quick else (NETWORKS, TASKS)
    total = 0
    for name in args.models:
        path = str(small_model(args.work / "small-llama")) if name == "small" else None
        total += collect(name, path, args.out, args.work, networks, tasks)
    print(f"{total} records appended to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
