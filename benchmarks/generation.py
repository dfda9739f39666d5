"""The local model vs the swarm (two servers on 127.0.0.1), SmolLM2-135M float32, each side in its own fresh process.

Why separate processes: a live swarm client slowed plain torch work in its own process (see
../shared/notes/measuring.md), so a baseline measured beside a client flatters the swarm. Here every measurement
runs in a new ``python benchmarks/generation.py --worker ...`` process, local and swarm interleaved so both see the
same machine load, and the medians are compared.

Workloads (batch 1, greedy): decode of 64 tokens after a 16-token prompt (tokens/s after the first token, step p50,
time to first token), the same after a 128-token prompt, and a batch forward of 8 x 128 tokens (tokens/s, no cache;
the median of 3 passes).
A third kind of worker measures local decode in a process that also holds a swarm client which has generated once
(``live_client_ratio``: 1.0 means the client costs the process nothing).

The last lines are ``decode_ratio=`` and ``forward_ratio=`` (swarm tokens/s / local tokens/s: higher is better),
``ttft_ratio=`` (swarm time to first token / local: lower is better) and ``live_client_ratio=`` (local decode beside a
live client / in a fresh process).

Takes about 5 minutes on the 2-core machine with ``--runs 3``, starts 2 servers (each with its libp2p daemon) and
``3 x runs`` worker processes one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- worker side: one fresh process per measurement

def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from swarm import AutoDistributedModelForCausalLM, resolve_model

    class Clock(LogitsProcessor):
        """Clock readings at each generated token (called once per step, before sampling)."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    source = resolve_model(args.model)
    local = remote = None
    if args.worker in ("local", "live-client"):
        local = AutoModelForCausalLM.from_pretrained(source.config_path, dtype=torch.float32).eval()
    if args.worker in ("swarm", "live-client"):
        remote = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers,
                                                                 compression=args.compression)
    vocab = (local or remote).config.vocab_size
    prompts = {length: torch.randint(100, vocab, (1, length), generator=torch.Generator().manual_seed(length))
               for length in (16, 128)}
    batch = torch.randint(100, vocab, (8, 128), generator=torch.Generator().manual_seed(8))

    def decode(model, prompt: torch.Tensor, tokens: int) -> dict[str, float]:
        clock = Clock()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]))
        assert out.shape[1] == prompt.shape[1] + tokens
        steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        return {"ttft": clock.times[0] - started, "decode_tps": len(steps) / (clock.times[-1] - clock.times[0]),
                "step_p50": statistics.median(steps)}

    def forward(model, repeats: int = 1) -> float:
        """Tokens/s of the batch forward: the median of ``repeats`` passes (one pass is ~2 s and varies by ~10%
        with the host's load)."""
        seconds = []
        with torch.no_grad():
            for _ in range(repeats):
                started = time.perf_counter()
                model(batch)
                seconds.append(time.perf_counter() - started)
        return batch.numel() / statistics.median(seconds)

    result: dict[str, float] = {}
    if args.worker == "live-client":
        decode(remote, prompts[16], 4)  # the client has generated through the swarm once, and stays alive
        model = local
    else:
        model = local or remote
    decode(model, prompts[16][:, :8], 4)  # warm-up: lazy initialisations, first connections
    if args.worker != "live-client":
        forward(model)
    short = decode(model, prompts[16], args.decode_tokens)
    long = decode(model, prompts[128], args.decode_tokens)
    result.update(decode_tps=short["decode_tps"], step_p50=short["step_p50"], ttft=short["ttft"],
                  decode_tps_128=long["decode_tps"], ttft_128=long["ttft"])
    if args.worker != "live-client":
        result["forward_tps"] = forward(model, repeats=3)
    if remote is not None:
        remote.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver side

def run_worker(kind: str, args: argparse.Namespace, peers: list[str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--decode-tokens",
               str(args.decode_tokens), "--compression", args.compression, "--peers", *peers]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} worker failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compression", default="blockwise8", help="the swarm client's codec between servers")
    parser.add_argument("--worker", choices=["local", "swarm", "live-client"], help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from swarm.blocks.span import load_config
    from swarm.hub.source import resolve_model
    from swarm.local_swarm import LocalSwarm

    num_blocks = load_config(resolve_model(args.model)).num_hidden_layers
    middle = num_blocks // 2
    results: dict[str, list[dict[str, float]]] = {"local": [], "swarm": [], "live-client": []}
    with LocalSwarm() as swarm:
        first = swarm.start_server(args.model, f"0:{middle}", [])
        swarm.start_server(args.model, f"{middle}:{num_blocks}", [first.maddr])
        for run in range(args.runs):
            for kind in results:
                results[kind].append(run_worker(kind, args, [first.maddr]))
                print(f"run {run + 1}/{args.runs} {kind}: {results[kind][-1]}", file=sys.stderr, flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(f"model={args.model} float32 batch=1 decode={args.decode_tokens} runs={args.runs} servers=2 "
          f"(blocks 0:{middle}, {middle}:{num_blocks}) on 127.0.0.1, compression={args.compression}, each side in "
          f"its own process")
    print(f"{'':>12} {'decode tok/s':>13} {'step p50 ms':>12} {'TTFT ms':>8} {'decode@128':>11} {'TTFT@128':>9} "
          f"{'fwd 8x128 tok/s':>16}")
    for kind in ("local", "swarm"):
        print(f"{kind:>12} {median(kind, 'decode_tps'):13.1f} {1000 * median(kind, 'step_p50'):12.1f} "
              f"{1000 * median(kind, 'ttft'):8.1f} {median(kind, 'decode_tps_128'):11.1f} "
              f"{1000 * median(kind, 'ttft_128'):9.1f} {median(kind, 'forward_tps'):16.1f}")
    print(f"{'live-client':>12} {median('live-client', 'decode_tps'):13.1f} "
          f"{1000 * median('live-client', 'step_p50'):12.1f} (local model in a process with a live swarm client)")
    print(f"decode_128_ratio={median('swarm', 'decode_tps_128') / median('local', 'decode_tps_128'):.3f}")
    print(f"decode_ratio={median('swarm', 'decode_tps') / median('local', 'decode_tps'):.3f}")
    print(f"ttft_ratio={median('swarm', 'ttft') / median('local', 'ttft'):.3f}")
    print(f"forward_ratio={median('swarm', 'forward_tps') / median('local', 'forward_tps'):.3f}")
    print(f"live_client_ratio={median('live-client', 'decode_tps') / median('local', 'decode_tps'):.3f}")


if __name__ == "__main__":
    main()
