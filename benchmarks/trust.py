"""Redundant-execution checks on SmolLM2-135M (real weights): the honest spread they must tolerate, how often they
catch a lying server, and what they cost in decode speed. Servers on 127.0.0.1: blocks 0:15 twice, 15:30 twice,
plus a liar on 15:30 (SWARM_TEST_FAULT=perturb:EPS) for the detection part only.

Duration on a 2-core machine: about 4 min (measured: 237 s, defaults). Processes: five servers (four honest, one
liar), each with its p2pd daemon, and a client p2pd per measurement (seven, one at a time); all stopped when it
ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, RoutingPolicy, load_tokenizer  # noqa: E402
from swarm.client.routing import RemoteSpan  # noqa: E402
from swarm.client.verification import check_output, tolerance  # noqa: E402
from swarm.compression import deserialize_tensor, serialize_tensor  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.rpc import protocol  # noqa: E402
from swarm.rpc.client import call  # noqa: E402

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, a fisherman",
           "Photosynthesis converts sunlight into", "The three laws of motion are"]


def decode_speed(model, ids: torch.Tensor, tokens: int) -> float:
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturbation", type=float, default=0.1)
    parser.add_argument("--detection-checks", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    with LocalSwarm() as swarm:
        first = swarm.start_server(None, "0:15", [])
        others = [swarm.start_server(None, blocks, [first.maddr], wait=False) for blocks in ("0:15", "15:30", "15:30")]
        liar = swarm.start_server(None, "15:30", [first.maddr], "--throughput", "1e9", wait=False,
                                  env={"SWARM_TEST_FAULT": f"perturb:{args.perturbation}"})
        for process in others + [liar]:
            process.wait_ready()
        honest_only = RoutingPolicy(blocked_servers=[liar.peer_id])

        print("== honest spread and false strikes (verify_probability=1, liar excluded) ==", flush=True)
        for compression in ("blockwise8", "none"):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                EMBEDDED_MODEL, initial_peers=[first.maddr], compression=compression, verify_probability=1.0,
                routing_policy=honest_only)
            errors, checks = {}, 0
            try:
                for ids in prompts:
                    with model.inference_session(max_length=ids.shape[1] + args.tokens) as session:
                        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
                        for verdict in session.checks:
                            if not verdict.skipped:
                                checks += 1
                                errors.setdefault("all", []).append(verdict.error)
                strikes = model.get_remote().manager.strikes_given
            finally:
                model.shutdown()
            spread = sorted(errors["all"])
            print(f"compression={compression}: {checks} checks, relative error median {statistics.median(spread):.2e}"
                  f", p99 {spread[int(0.99 * (len(spread) - 1))]:.2e}, max {spread[-1]:.2e}; tolerance of the "
                  f"8-bit hop {tolerance('blockwise8', 'float32'):.0e}, of float16 ends "
                  f"{tolerance('float16', 'float32'):.0e}; false strikes {strikes}", flush=True)

        print(f"== detection of a server adding noise of relative size {args.perturbation} ==", flush=True)
        for codec in ("none", "blockwise8"):
            model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[first.maddr],
                                                                    compression=codec)
            manager = model.get_remote().manager
            detected = 0
            try:
                manager.loop.run(manager.update(force=True))
                span = RemoteSpan(liar.peer_id, 15, 30, manager.servers[liar.peer_id])
                for i in range(args.detection_checks):
                    inputs = torch.randn(1, 4 + i % 12, 576, generator=torch.Generator().manual_seed(i)) * 3
                    positions = torch.arange(inputs.shape[1])[None]
                    reply = manager.loop.run(call(manager.p2p, liar.peer_id, protocol.FORWARD, {
                        "start": 15, "end": 30, "hidden": serialize_tensor(inputs),
                        "position_ids": serialize_tensor(positions), "output_codec": codec}, timeout=60))
                    verdict = manager.loop.run(check_output(manager, span, inputs, positions, None,
                                                            deserialize_tensor(reply["hidden"]), codec))
                    detected += liar.peer_id in verdict.struck
                    manager.stats.clear()
            finally:
                model.shutdown()
            print(f"output codec {codec}: detected {detected}/{args.detection_checks} "
                  f"({100 * detected / args.detection_checks:.1f}%)", flush=True)

        print("== cost of checks: decode tokens/s through 2 honest servers ==", flush=True)
        ids = prompts[0]
        for probability in (0.0, 0.05, 1.0):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                EMBEDDED_MODEL, initial_peers=[first.maddr], verify_probability=probability,
                routing_policy=honest_only)
            try:
                decode_speed(model, ids, 4)  # warm-up
                speeds = [decode_speed(model, ids, args.tokens) for _ in range(3)]
            finally:
                model.shutdown()
            print(f"verify_probability={probability:.2f}: {statistics.median(speeds):.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
