"""Activation codecs on the wire: bytes, codec speed, quality and end-to-end speed through real servers.

1. Bytes per decode step and per prefill for SmolLM2's hidden states (576 wide), per codec, vs float32.
2. Codec speed (MB/s of float32 input) on 2 MiB and 20 MiB tensors.
3. Weight quantization of the blocks (int8, nf4): memory per block, teacher-forced top-1 agreement and mean KL
   against float32 weights, and the time of one forward over all 30 blocks (in-process: no network involved).
4. Quality through two real servers of the embedded SmolLM2 (float32): teacher-forced top-1 agreement and mean KL
   of next-token distributions against compression="none", and where greedy decoding first diverges.
5. Decode tokens/s and prefill time, none vs 8-bit, on loopback and behind WAN proxies (RTT and Mbit/s below).

Duration on a 2-core machine: about 4 min (measured: 233 s, defaults). Processes: a bootstrap node and four servers,
each with its p2pd daemon; two WAN proxies at a time (four in all); a client p2pd per measured configuration, one at
a time (eleven in all); all stopped when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed
terminal).
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
from generation import measure  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, RoutingPolicy, load_tokenizer  # noqa: E402
from swarm.compression import CODECS, blockwise, deserialize_tensor, serialize_tensor  # noqa: E402
from swarm.local_swarm import LocalSwarm, free_port  # noqa: E402
from swarm.rpc.framing import encode_message  # noqa: E402

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Photosynthesis is the process by which green plants use sunlight to",
    "Q: What is 12 times 12?\nA:",
    "The Industrial Revolution began in Britain in the late 18th century and",
]
# (name, compression between servers, edge_compression at the client's ends)
CONFIGS = [("float16", "float16", "float16"), ("bfloat16", "bfloat16", "bfloat16"),
           ("8-bit between servers, float16 ends (default)", "blockwise8", None),
           ("8-bit on every link", "blockwise8", "blockwise8")]


def wire_bytes() -> None:
    print("== 1. bytes on the wire (hidden-state message, SmolLM2 width 576) ==")
    for label, shape in (("decode step", (1, 1, 576)), ("prefill 128", (1, 128, 576))):
        tensor = torch.randn(shape)
        raw = len(encode_message({"hidden": serialize_tensor(tensor, "none")}))
        sizes = {codec: len(encode_message({"hidden": serialize_tensor(tensor, codec)})) for codec in CODECS}
        payload = {c: sum(len(v) for v in serialize_tensor(tensor, c) if isinstance(v, bytes)) for c in CODECS}
        print(f"{label:>12}: message " + "  ".join(f"{c}={n} B ({n / raw:.3f})" for c, n in sizes.items()))
        print(f"{'':>12}  tensor data only: " + "  ".join(f"{c}={n} B ({n / payload['none']:.3f})"
                                                       for c, n in payload.items()))
    # Through 2 servers a step crosses 4 links: client->S1 and S2->client (the ends), S1->client->S2 (relayed).
    for label, shape in (("decode step", (1, 1, 576)), ("prefill 128", (1, 128, 576))):
        tensor = torch.randn(shape)
        size = {c: len(encode_message({"hidden": serialize_tensor(tensor, c)})) for c in ("none", "float16",
                                                                                           "blockwise8")}
        default = 2 * size["float16"] + 2 * size["blockwise8"]
        print(f"{label} over 2 servers, default (ends float16, relay 8-bit): {default} B vs {4 * size['none']} B "
              f"raw ({default / (4 * size['none']):.3f})")


def codec_speed() -> None:
    print("== 2. codec speed, MB/s of float32 input (median of 7) ==")
    blockwise.warm_up()
    for label, shape in (("2 MiB", (1, 128, 4096)), ("20 MiB", (1, 1280, 4096))):
        tensor = torch.randn(shape)
        megabytes = tensor.numel() * 4 / 2**20
        parts = []
        for codec in CODECS:
            encode_times, decode_times = [], []
            for _ in range(7):
                started = time.perf_counter()
                encoded = serialize_tensor(tensor, codec)
                encode_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                deserialize_tensor(encoded)
                decode_times.append(time.perf_counter() - started)
            parts.append(f"{codec}: enc {megabytes / statistics.median(encode_times):7.0f} "
                         f"dec {megabytes / statistics.median(decode_times):7.0f}")
        print(f"{label:>6}: " + " | ".join(parts))


def quality(peers: list[str], blocked: list[str], greedy_tokens: int) -> None:
    print("== 4. quality through 2 servers, vs compression='none' ==")
    tokenizer = load_tokenizer()
    exact = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=peers, compression="none",
                                                            routing_policy=RoutingPolicy(blocked_servers=blocked))
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    with torch.no_grad():
        reference = [exact(ids).logits for ids in prompts]
        reference_greedy = [exact.generate(ids, max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens,
                                           do_sample=False) for ids in prompts]
    exact.shutdown()
    for name, compression, final in CONFIGS:
        model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=peers,
                                                                compression=compression, edge_compression=final,
                                                                routing_policy=RoutingPolicy(blocked_servers=blocked))
        kls, agreement, divergence = [], [], []
        with torch.no_grad():
            for ids, ref_logits, ref_greedy in zip(prompts, reference, reference_greedy, strict=True):
                logits = model(ids).logits
                ref, other = ref_logits.log_softmax(-1), logits.log_softmax(-1)
                kls.append((ref.exp() * (ref - other)).sum(-1).mean().item())
                agreement.append((ref.argmax(-1) == other.argmax(-1)).float().mean().item())
                greedy = model.generate(ids, max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens,
                                        do_sample=False)
                new, ref_new = greedy[0, ids.shape[1]:], ref_greedy[0, ids.shape[1]:]
                differs = (new != ref_new).nonzero()
                divergence.append(int(differs[0]) if len(differs) else None)
        model.shutdown()
        diverged = [d for d in divergence if d is not None]
        print(f"{name:>46}: mean KL {statistics.mean(kls):.2e} nats, top-1 agreement {statistics.mean(agreement):.4f}, "
              f"greedy identical for {divergence.count(None)}/{len(divergence)} prompts over {greedy_tokens} tokens"
              + (f", first divergence at tokens {diverged}" if diverged else ""))


def speed(label: str, peers: list[str], blocked: list[str], input_ids: torch.Tensor, decode_tokens: int,
          runs: int) -> None:
    results = {}
    for compression in ("none", "blockwise8"):
        model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=peers,
                                                                compression=compression,
                                                                routing_policy=RoutingPolicy(blocked_servers=blocked))
        measure(model, input_ids[:, :8], 2)  # warm-up
        runs_ = [measure(model, input_ids, decode_tokens) for _ in range(runs)]
        model.shutdown()
        prefill = statistics.median(r[0] for r in runs_)
        decode = statistics.median(r[1] for r in runs_)
        results[compression] = (input_ids.shape[1] / prefill, decode)
    (p_none, d_none), (p_8, d_8) = results["none"], results["blockwise8"]
    print(f"{label:>28}: prefill {p_none:.3f} s -> {p_8:.3f} s 8-bit (speed-up {p_none / p_8:.2f}x), "
          f"decode {d_none:.1f} -> {d_8:.1f} tokens/s ({d_8 / d_none:.2f}x)")


def weight_quantization(prompt_ids: list[torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    from swarm import resolve_model
    from swarm.blocks.quantization import parameter_bytes
    from swarm.blocks.span import BlockSpan

    print("== 3. weight quantization of all 30 blocks (in-process), vs float32 weights ==")
    source = resolve_model(EMBEDDED_MODEL)
    local = AutoModelForCausalLM.from_pretrained(source.config_path).eval()
    head = lambda hidden: local.lm_head(local.model.norm(hidden))  # noqa: E731
    reference = None
    for quantization in ("none", "int8", "nf4"):
        span = BlockSpan.from_pretrained(source, 0, 30, quantization=quantization)
        mib = parameter_bytes(span.layers) / 30 / 2**20
        logits, elapsed = [], []
        with torch.no_grad():
            for ids in prompt_ids:
                started = time.perf_counter()
                hidden = span(local.model.embed_tokens(ids), torch.arange(ids.shape[1])[None])
                elapsed.append(time.perf_counter() - started)
                logits.append(head(hidden).log_softmax(-1))
        if reference is None:
            reference = logits
        kl = statistics.mean((r.exp() * (r - q)).sum(-1).mean().item() for r, q in zip(reference, logits, strict=True))
        top1 = statistics.mean((r.argmax(-1) == q.argmax(-1)).float().mean().item()
                               for r, q in zip(reference, logits, strict=True))
        print(f"{quantization:>5}: {mib:5.2f} MiB per block, top-1 agreement {top1:.3f}, mean KL {kl:.3e} nats, "
              f"forward {statistics.median(elapsed) * 1000:.0f} ms per prompt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbits", type=float, nargs="*", default=[100.0, 10.0])
    args = parser.parse_args()

    wire_bytes()
    codec_speed()
    tokenizer = load_tokenizer()
    weight_quantization([tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS])
    input_ids = torch.randint(100, 40000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    with LocalSwarm() as swarm:
        bootstrap = swarm.start_dht()
        ports = [free_port() for _ in range(4)]  # two servers, each with a proxy port in front of it
        for (server_port, proxy_port), blocks in zip(((ports[0], ports[1]), (ports[2], ports[3])),
                                                     ("0:15", "15:30"), strict=True):
            swarm.start_server(None, blocks, [bootstrap.maddr], "--port", str(server_port), "--announce-maddrs",
                               f"/ip4/127.0.0.1/tcp/{proxy_port}", wait=False)
        direct = [swarm.start_server(None, blocks, [bootstrap.maddr], wait=False) for blocks in ("0:15", "15:30")]
        for process in swarm.processes[1:]:
            process.wait_ready()
        # The direct pair and the proxied pair serve the same blocks: route each measurement to one pair only.
        proxied = [p.peer_id for p in swarm.processes[1:3]]
        direct_ids = [p.peer_id for p in direct]
        peers = [bootstrap.maddr]
        quality(peers, proxied, args.greedy_tokens)

        print(f"== 5. speed through 2 servers (prompt {args.prompt_tokens}, {args.decode_tokens} decode tokens, "
              f"median of {args.runs}) ==")
        speed("loopback", peers, proxied, input_ids, args.decode_tokens, args.runs)
        for mbit in args.mbits:
            proxies = [swarm.start_wan_proxy(server_port, proxy_port, args.rtt_ms, mbit)
                       for server_port, proxy_port in ((ports[0], ports[1]), (ports[2], ports[3]))]
            speed(f"WAN {args.rtt_ms:.0f} ms RTT, {mbit:.0f} Mbit/s", peers, direct_ids, input_ids,
                  args.decode_tokens, args.runs)
            for proxy in proxies:
                proxy.stop()


if __name__ == "__main__":
    main()
