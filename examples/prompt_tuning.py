"""Train a prompt through remote blocks (Petals' prompt tuning): servers run forward and backward, only the prompt
is trained. ``--tuning-mode deep_ptune`` (the default) also learns vectors the servers add before every block.

    python examples/prompt_tuning.py --initial-peers MADDR --steps 10
Without --initial-peers, a local swarm of two servers is started on 127.0.0.1 for the run.

Duration on a 2-core machine, with the local swarm and the default 10 steps: 36 s (measured). Processes: without
--initial-peers two servers, each with its p2pd daemon; the client's p2pd either way; all stopped when it ends, also
on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, load_tokenizer  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402

TEXTS = [
    "The swarm answers: every block runs on a volunteer's machine.",
    "The swarm answers: clients keep the embeddings and the head.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--tuning-mode", choices=["ptune", "deep_ptune"], default="deep_ptune")
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)

    with contextlib.ExitStack() as stack:
        peers = peers_or_local_swarm(stack, args.model, args.initial_peers)
        tokenizer = load_tokenizer(args.model)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers,
                                                                tuning_mode=args.tuning_mode,
                                                                pre_seq_len=args.prompt_tokens)
        stack.callback(model.shutdown)
        model.requires_grad_(False)  # only the prompts learn
        prompts = [model.model.prompt_embeddings.weight]
        if args.tuning_mode == "deep_ptune":
            prompts.append(model.model.intermediate_prompt_embeddings.weight)
        for prompt in prompts:
            prompt.requires_grad_(True)
        with torch.no_grad():  # start from the embeddings of real words
            init_ids = tokenizer(" answer briefly", return_tensors="pt")["input_ids"][0].repeat(args.prompt_tokens)
            prompts[0].copy_(model.get_input_embeddings()(init_ids[:args.prompt_tokens]))
        optimizer = torch.optim.Adam(prompts, lr=args.lr)

        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

        losses = []
        for step in range(args.steps):
            # the model puts the prompt before each row (and the deep prompts on the servers) by itself
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()  # through both servers' backward RPCs into the prompts
            optimizer.step()
            losses.append(loss.item())
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")


if __name__ == "__main__":
    main()
