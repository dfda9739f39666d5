"""``python -m swarm.chat [MODEL] --initial-peers MADDR`` (or ``swarm-chat``): chat with a model in the terminal,
through the swarm.

A conversation runs over one inference session: the servers keep its KV cache between turns, so each turn sends
only its new tokens. Answers are printed as they are generated; log lines (a failover warning, say) emitted while an
answer streams are held and printed after it. Commands: ``/help``, ``/reset`` starts a new conversation, ``/exit``
or the end of input (Ctrl-D) ends; Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from swarm.hub.source import check_model_name
from swarm.utils.cli import Parser, clear_interrupt, entry_point, interrupt_requested, positive, setup_logging

if TYPE_CHECKING:  # imported at run time only once the arguments are parsed: --help answers at once
    import torch
    from transformers import PreTrainedTokenizerBase

    from swarm.client.inference_session import InferenceSession
    from swarm.client.model import DistributedModelForCausalLM

PROMPT = "You: "  # printed when the next user turn is awaited (tests wait for it too)
ANSWER = "Assistant: "
CODEC_NAMES = ("bfloat16", "blockwise8", "float16", "none")  # swarm.compression.CODECS (checked by tests)
COMMANDS = {
    "/help": "this list",
    "/reset": "start a new conversation (the servers forget this one)",
    "/exit": "end the chat (also /quit, or Ctrl-D on an empty line)",
}
HELP = "Commands:\n" + "\n".join(f"  {name:<7} {text}" for name, text in COMMANDS.items()) + \
    "\nCtrl-C stops an answer; anything else is your next message."


def build_parser() -> Parser:
    parser = Parser("swarm.chat", "Chat with a model served by the swarm.", log_level="WARNING", initial_peers=True)
    parser.add_model()
    network = parser.add_argument_group("swarm")
    parser.add_initial_peers(network, required=True)
    network.add_argument("--compression", choices=CODEC_NAMES, default="blockwise8",
                         help="wire codec of hidden states between servers (none: bit-exact)")
    chat = parser.add_argument_group("conversation")
    chat.add_argument("--system", default=None, help="a system message opening each conversation")
    chat.add_argument("--max-new-tokens", type=positive(int), default=256, metavar="N",
                      help="longest answer, in tokens")
    chat.add_argument("--max-length", type=positive(int), default=2048, metavar="N",
                      help="session length in tokens: a conversation's turns together (/reset when full)")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep tokens up to this mass")
    chat.add_argument("--verbose", action="store_true",
                      help="print the chain of servers and, after each answer, the tokens sent and cached")
    return parser


class AnswerLog(logging.StreamHandler):
    """Log lines to stderr, except while an answer streams: records emitted then are held and printed after the
    answer, so that a warning never lands in the middle of the answer's line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.held: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        if self.held is not None:
            self.held.append(record)
        else:
            super().emit(record)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        with self.lock:
            self.held = []
        try:
            yield
        finally:
            with self.lock:
                held, self.held = self.held, None
            for record in held:
                self.handle(record)


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
                 args: argparse.Namespace, log: AnswerLog | None = None):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.log = log or AnswerLog()
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
        from transformers import TextStreamer

        while True:
            text = read_turn()
            command = text.strip().lower() if text is not None else "/exit"
            if command in ("/exit", "/quit"):
                print()
                return "exit"
            if command == "/reset":
                print("(new conversation)", flush=True)
                return "reset"
            if command in ("/help", "/?", "/commands"):
                print(HELP, flush=True)
                continue
            if command.startswith("/") and " " not in command and command not in COMMANDS:
                print(f"Unknown command {text.strip()}; /help lists the commands.", flush=True)
                continue
            if not command:
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
            clear_interrupt()
            with self.log.holding():  # released after the answer's last line, whichever way it ends
                try:
                    output = self.model.generate(input_ids, max_new_tokens=min(self.args.max_new_tokens, room),
                                                 streamer=streamer, stopping_criteria=[_stop_on_ctrl_c()],
                                                 **self.sampling)
                    if interrupt_requested():  # its KeyboardInterrupt was lost, the criterion stopped the answer
                        raise KeyboardInterrupt
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


def _stop_on_ctrl_c():
    """A stopping criterion for ``generate``: the answer ends at the next token after Ctrl-C, even when the
    ``KeyboardInterrupt`` itself was swallowed on the way (say, raised inside a finalizer)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnCtrlC(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), interrupt_requested(), dtype=torch.bool,
                              device=input_ids.device)

    return StopOnCtrlC()


@entry_point
def main() -> None:
    args = build_parser().parse_args()
    log = AnswerLog()
    setup_logging(args.log_level, log)
    check_model_name(args.model)  # a mistyped model fails now, not after torch has loaded
    logging.captureWarnings(True)  # Python warnings go through the log too, so they are held during answers

    from hivemind.utils.logging import use_hivemind_log_handler

    from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, load_tokenizer

    use_hivemind_log_handler("nowhere")  # hivemind's records through our handler (held during answers) too
    logging.getLogger("hivemind").setLevel(logging.DEBUG if args.log_level == "DEBUG" else logging.WARNING)
    tokenizer = load_tokenizer(args.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            compression=args.compression)
    try:
        if args.verbose:
            chain = " -> ".join(f"{span.peer_id[-8:]} (blocks {span.start}:{span.end})" for span in model.route())
            print(f"Chain: {chain}", file=sys.stderr)
        print(f"Chatting with {args.model or EMBEDDED_MODEL} through the swarm. /help lists the commands, /exit or "
              f"Ctrl-D ends.", file=sys.stderr, flush=True)
        Chat(model, tokenizer, args, log).run()
    except KeyboardInterrupt:
        print()
    finally:
        model.shutdown()


if __name__ == "__main__":
    main()
