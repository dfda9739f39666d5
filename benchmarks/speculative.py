"""Speculative greedy decoding through the swarm (SmolLM2-135M float32, two servers on 127.0.0.1) against plain
greedy decoding through the same swarm: prompt-lookup drafts, and drafts from a truncated local copy of the model.

Two prompts: an input-grounded one (quote a ~200-token passage back, where prompt lookup should shine) and an
open-ended one (a story, where drafts from the prompt rarely hold). For each, every method generates the same number
of tokens, runs interleaved; each output is compared with plain greedy's (a speculative step computes several
positions at once, whose float rounding can differ from one position at a time: at a near-tie, greedy may part).

The last lines are ``<method>_speedup_<prompt>=`` (tokens/s over plain greedy through the swarm, medians of
``--runs``), with the acceptance rate of the drafts. Takes about 4 minutes with ``--runs 3`` on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"
PASSAGE = (
    "The lighthouse at the end of the harbour was built in 1874 from granite quarried on the island itself. Its "
    "lamp burned whale oil for the first twenty years, then paraffin, and finally electricity after the war. Three "
    "families kept it over a century: the Morrows, who came from the mainland with nothing but a letter of "
    "appointment; the Kellys, who stayed for forty-one years and raised nine children in the keeper's cottage; and "
    "the Andersons, the last of them, who left in 1987 when the light was automated. Visitors today climb the "
    "ninety-six steps to the lantern room, where the old brass fittings still shine, and look out over the reef "
    "that wrecked the schooner Margaret in the winter storm of 1869, the disaster that led to the light being built."
)
PROMPTS = {
    "quote": f"Repeat the following passage exactly, word for word, without any comment.\n\n{PASSAGE}",
    "story": "Write a short story about a fox who learns to fly.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="drafts per step for prompt lookup")
    parser.add_argument("--draft-blocks", type=int, default=8, help="blocks of the truncated local draft model")
    parser.add_argument("--draft-tokens", type=int, default=4, help="drafts per step for the draft model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compression", default="blockwise8", help="the client's codec between servers")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM, load_tokenizer
    from swarm.blocks.span import load_config
    from swarm.hub.source import resolve_model
    from swarm.local_swarm import LocalSwarm

    source = resolve_model(args.model)
    num_blocks = load_config(source).num_hidden_layers
    middle = num_blocks // 2
    tokenizer = load_tokenizer(args.model)
    draft = AutoModelForCausalLM.from_pretrained(source.config_path, num_hidden_layers=args.draft_blocks,
                                                 dtype=torch.float32).eval()  # the first blocks and the head
    inputs = {name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)["input_ids"]
              for name, text in PROMPTS.items()}
    methods = {"plain": {}, "lookup": {"prompt_lookup_num_tokens": args.lookup_tokens},
               "draft": {"assistant_model": draft, "num_assistant_tokens": args.draft_tokens}}
    times: dict[tuple[str, str], list[float]] = {}
    acceptance: dict[tuple[str, str], list[float]] = {}
    divergence: dict[tuple[str, str], int] = {}  # new tokens equal to plain greedy before the first difference
    with LocalSwarm() as swarm:
        first = swarm.start_server(args.model, f"0:{middle}", [])
        swarm.start_server(args.model, f"{middle}:{num_blocks}", [first.maddr])
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[first.maddr],
                                                                compression=args.compression)
        # eos ignored: every method generates the same number of tokens
        greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
        model.generate(inputs["story"][:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        expected = {}
        for run in range(args.runs):
            for prompt, ids in inputs.items():
                for method, options in methods.items():
                    kwargs = dict(greedy, **options)
                    started = time.perf_counter()
                    with torch.no_grad():
                        out = model.generate(ids, **kwargs)
                    times.setdefault((prompt, method), []).append(time.perf_counter() - started)
                    if method == "plain":
                        expected.setdefault(prompt, out)
                    else:
                        acceptance.setdefault((prompt, method), []).append(model.last_speculation.acceptance_rate)
                        same = out.shape == expected[prompt].shape and bool((out == expected[prompt]).all())
                        if not same:  # the first new token where the two greedy paths part
                            length = min(out.shape[1], expected[prompt].shape[1])
                            differs = (out[0, :length] != expected[prompt][0, :length]).nonzero()
                            first = int(differs[0]) - ids.shape[1] if len(differs) else length - ids.shape[1]
                            divergence.setdefault((prompt, method), first)
                    print(f"run {run + 1} {prompt} {method}: {times[prompt, method][-1]:.2f} s", file=sys.stderr,
                          flush=True)
        print(f"quote sample: {tokenizer.decode(expected['quote'][0, inputs['quote'].shape[1]:])[:200]!r}",
              file=sys.stderr)
        model.shutdown()

    print(f"model={args.model} float32, 2 servers (0:{middle}, {middle}:{num_blocks}) on 127.0.0.1, "
          f"compression={args.compression}, batch 1 greedy, {args.new_tokens} new tokens, median of {args.runs}; "
          f"lookup "
          f"{args.lookup_tokens} drafts/step; draft model = first {args.draft_blocks} blocks + head, "
          f"{args.draft_tokens} drafts/step")
    print(f"{'prompt':>8} {'method':>8} {'tokens/s':>9} {'acceptance':>11}")
    for prompt in PROMPTS:
        for method in methods:
            rate = statistics.median(acceptance[prompt, method]) if method != "plain" else float("nan")
            print(f"{prompt:>8} {method:>8} {args.new_tokens / statistics.median(times[prompt, method]):9.1f} "
                  f"{rate:11.2f}")
    for prompt in PROMPTS:
        for method in ("lookup", "draft"):
            speedup = statistics.median(times[prompt, "plain"]) / statistics.median(times[prompt, method])
            rate = statistics.median(acceptance[prompt, method])
            same = "identical" if (prompt, method) not in divergence else \
                f"differs from token {divergence[prompt, method]}"
            print(f"{method}_speedup_{prompt}={speedup:.2f} acceptance={rate:.2f} output={same}")


if __name__ == "__main__":
    main()
