"""Multi-turn chat over one inference session: each turn sends only its new tokens; servers keep the history.

    python examples/chat.py --initial-peers MADDR            # interactive, one user turn per line
    python examples/chat.py --prompts "Hi!" "What's 2+2?"     # scripted turns
Without --initial-peers, a local swarm of two servers is started on 127.0.0.1 for the session.

Duration on a 2-core machine, with the local swarm and two scripted turns (``--prompts``): 32 s (measured);
interactive, as long as you chat. Processes: without --initial-peers two servers, each with its p2pd daemon; the
client's p2pd either way; all stopped when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed
terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import TextStreamer  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, load_tokenizer  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402


def user_turns(prompts: list[str] | None):
    if prompts:
        for prompt in prompts:
            print(f"\nYou: {prompt}", flush=True)
            yield prompt
        return
    while True:
        try:
            line = input("\nYou: ")
        except EOFError:
            return
        if line.strip():
            yield line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--prompts", nargs="*", help="scripted user turns (default: read lines from stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048, help="session length: all turns together")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        peers = peers_or_local_swarm(stack, args.model, args.initial_peers)
        tokenizer = load_tokenizer(args.model)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers)
        stack.callback(model.shutdown)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        conversation = []
        with model.inference_session(max_length=args.max_length) as session:
            for text in user_turns(args.prompts):
                conversation.append({"role": "user", "content": text})
                input_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                          return_tensors="pt", return_dict=True)["input_ids"]
                print("Assistant: ", end="", flush=True)
                sent_before = session.tokens_sent
                output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        streamer=streamer)
                # Kept as generated (not stripped), so the next turn's prompt re-tokenizes to what is cached.
                answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
                conversation.append({"role": "assistant", "content": answer})
                print(f"[turn: {session.tokens_sent - sent_before} positions sent, "
                      f"{session.position} positions cached on the servers]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
