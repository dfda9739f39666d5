"""``python -m swarm.chat [MODEL] --initial-peers MADDR``: chat with a model in the terminal, through the swarm.

A conversation runs over one inference session: the servers keep its KV cache between turns, so each turn sends
only its new tokens. Answers are printed as they are generated. ``/reset`` starts a new conversation, ``/exit`` or
the end of input (Ctrl-D) ends, Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, InferenceSession, load_tokenizer
from swarm.client.model import DistributedModelForCausalLM
from swarm.compression import CODECS

PROMPT = "You: "  # printed when the next user turn is awaited (tests wait for it too)
ANSWER = "Assistant: "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with a model served by the swarm.")
    parser.add_argument("model", nargs="?", default=None,
                        help="local directory or hub name (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm node")
    parser.add_argument("--system", default=None, help="a system message opening each conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="session length in tokens: a conversation's turns together (/reset when full)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep tokens up to this mass")
    parser.add_argument("--compression", choices=sorted(CODECS), default="blockwise8",
                        help="wire codec of hidden states between servers (none: bit-exact)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the chain of servers and, after each answer, the tokens sent and cached")
    return parser


def read_turn() -> str | None:
    """The user's next line, or None at the end of input."""
    print(f"\n{PROMPT}", end="", flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def reused_positions(session: InferenceSession, input_ids: torch.Tensor) -> int:
    """How many leading positions of ``input_ids`` the session's servers hold already (what generate will not
    send again; an edited history rewinds to the common prefix)."""
    known = session.token_ids
    if known is None:
        return 0
    length = min(known.shape[1], input_ids.shape[1] - 1, session.position)  # the last token is always sent
    return int((known[0, :length] == input_ids[0, :length]).long().cumprod(0).sum())


class Chat:
    """Conversations with ``model``: ``run()`` until /exit or the end of input."""

    def __init__(self, model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase,
                 args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
                         if args.temperature > 0 else dict(do_sample=False))

    def run(self) -> None:
        conversation = self.opening()
        while True:
            # One session per conversation; after a failure the same conversation goes on in a new session.
            with self.model.inference_session(max_length=self.args.max_length) as session:
                outcome = self.turns(session, conversation)
            if outcome == "exit":
                return
            if outcome == "reset":
                conversation = self.opening()

    def opening(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def turns(self, session: InferenceSession, conversation: list[dict[str, str]]) -> str:
        """Answer user turns within ``session``: returns "exit", "reset" or "failed" (go on in a new session)."""
        while True:
            text = read_turn()
            if text is None or text.strip() == "/exit":
                print()
                return "exit"
            if text.strip() == "/reset":
                print("(new conversation)", flush=True)
                return "reset"
            if not text.strip():
                continue
            conversation.append({"role": "user", "content": text})
            input_ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                           return_tensors="pt", return_dict=True)["input_ids"]
            room = self.args.max_length - input_ids.shape[1]
            if room < 1:
                conversation.pop()
                print(f"The conversation is longer than this session's {self.args.max_length} tokens; /reset "
                      f"starts a new one (or use a larger --max-length).", file=sys.stderr, flush=True)
                continue
            reused = reused_positions(session, input_ids)
            print(ANSWER, end="", flush=True)
            # A new streamer each turn: one cut off by Ctrl-C would keep its half-printed state.
            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            try:
                output = self.model.generate(input_ids, max_new_tokens=min(self.args.max_new_tokens, room),
                                             streamer=streamer, **self.sampling)
            except KeyboardInterrupt:
                conversation.pop()
                print("\n(interrupted)", flush=True)
                return "failed"  # the session may hold half a step: continue in a fresh one
            except Exception as e:  # the swarm failed for good (no server left for a block, ...)
                conversation.pop()
                print(f"\nError: {e}", file=sys.stderr, flush=True)
                return "failed"
            answer = self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
            # Kept as generated (not stripped) so that it tokenizes back to the cached tokens as far as possible.
            conversation.append({"role": "assistant", "content": answer})
            if self.args.verbose:
                print(f"[{input_ids.shape[1] - reused} new prompt tokens sent, {session.position} positions cached "
                      f"on the servers]", file=sys.stderr, flush=True)


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=os.environ.get("SWARM_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = load_tokenizer(args.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            compression=args.compression)
    try:
        if args.verbose:
            chain = " -> ".join(f"{span.peer_id[-8:]} (blocks {span.start}:{span.end})" for span in model.route())
            print(f"Chain: {chain}", file=sys.stderr)
        print(f"Chatting with {args.model or EMBEDDED_MODEL} through the swarm. /reset starts over, /exit or Ctrl-D "
              f"ends.", file=sys.stderr, flush=True)
        Chat(model, tokenizer, args).run()
    except KeyboardInterrupt:
        print()
    finally:
        model.shutdown()


if __name__ == "__main__":
    main()
