"""Train a soft prompt through remote blocks: servers run forward and backward, only the prompt is trained.

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
from torch import nn  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, load_tokenizer  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402

TEXTS = [
    "The swarm answers: every block runs on a volunteer's machine.",
    "The swarm answers: clients keep the embeddings and the head.",
]


class SoftPrompt(nn.Module):
    """``num_tokens`` trainable input embeddings prepended to every sequence."""

    def __init__(self, embeddings: nn.Embedding, num_tokens: int, init_ids: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(embeddings(init_ids[:num_tokens]).detach().clone())

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prompt.expand(token_embeddings.shape[0], -1, -1), token_embeddings], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)

    with contextlib.ExitStack() as stack:
        peers = peers_or_local_swarm(stack, args.model, args.initial_peers)
        tokenizer = load_tokenizer(args.model)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers)
        stack.callback(model.shutdown)
        model.requires_grad_(False)  # only the soft prompt learns

        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        embeddings = model.get_input_embeddings()
        soft_prompt = SoftPrompt(embeddings, args.prompt_tokens, tokenizer(" answer briefly", return_tensors="pt")
                                 ["input_ids"][0].repeat(args.prompt_tokens))
        optimizer = torch.optim.Adam(soft_prompt.parameters(), lr=args.lr)
        prompt_mask = torch.ones(len(TEXTS), args.prompt_tokens, dtype=batch["attention_mask"].dtype)
        attention_mask = torch.cat([prompt_mask, batch["attention_mask"]], dim=1)
        labels = torch.cat([torch.full_like(prompt_mask, -100), batch["input_ids"].masked_fill(
            batch["attention_mask"] == 0, -100)], dim=1)

        losses = []
        for step in range(args.steps):
            inputs_embeds = soft_prompt(embeddings(batch["input_ids"]))
            loss = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()  # through both servers' backward RPCs into the soft prompt
            optimizer.step()
            losses.append(loss.item())
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")


if __name__ == "__main__":
    main()
