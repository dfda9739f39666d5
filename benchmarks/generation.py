"""Local model vs the swarm (two servers on 127.0.0.1) for SmolLM2-135M in float32, batch 1, side by side.

Prefill: tokens/s of ``generate(max_new_tokens=1)`` on a prompt. Decode: tokens/s of the extra steps of
``generate(max_new_tokens=1 + N)``. Each figure is the median of several runs, local and swarm interleaved so
both see the same machine load. The last line is ``decode_ratio=<swarm/local>``.

Duration on a 2-core machine: 77 s (measured, defaults). Processes: two servers, each with its p2pd daemon, and the
client's p2pd; all stopped when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, resolve_model  # noqa: E402
from swarm.utils.local_swarm import LocalSwarm  # noqa: E402


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return elapsed


def measure(model, input_ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run."""
    prefill = timed_generate(model, input_ids, 1)
    full = timed_generate(model, input_ids, 1 + decode_tokens)
    return input_ids.shape[1] / prefill, decode_tokens / max(full - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    source = resolve_model(args.model)
    local = AutoModelForCausalLM.from_pretrained(source.config_path, dtype=torch.float32).eval()
    num_blocks = local.config.num_hidden_layers
    middle = num_blocks // 2
    input_ids = torch.randint(100, local.config.vocab_size, (1, args.prompt_tokens),
                              generator=torch.Generator().manual_seed(0))

    with LocalSwarm() as swarm:
        first = swarm.start_server(args.model, f"0:{middle}", [])
        swarm.start_server(args.model, f"{middle}:{num_blocks}", [first.maddr])
        remote = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[first.maddr])
        try:
            for model in (local, remote):  # warm-up: lazy inits, first connections
                measure(model, input_ids[:, :16], 4)
            results = {"local": [], "swarm": []}
            for _ in range(args.runs):
                results["local"].append(measure(local, input_ids, args.decode_tokens))
                results["swarm"].append(measure(remote, input_ids, args.decode_tokens))
        finally:
            remote.shutdown()

    print(f"model={args.model} float32 batch=1 prompt={args.prompt_tokens} decode={args.decode_tokens} "
          f"runs={args.runs} servers=2 (blocks 0:{middle}, {middle}:{num_blocks}) on 127.0.0.1, "
          f"torch threads={torch.get_num_threads()}")
    medians = {}
    for name, runs in results.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        medians[name] = (prefill, decode)
        print(f"{name:>5}: prefill {prefill:8.1f} tokens/s   decode {decode:6.1f} tokens/s")
    print(f"prefill_ratio={medians['swarm'][0] / medians['local'][0]:.3f}")
    print(f"decode_ratio={medians['swarm'][1] / medians['local'][1]:.3f}")


if __name__ == "__main__":
    main()
