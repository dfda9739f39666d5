"""``python -m swarm.api [MODEL] --initial-peers MADDR``: an OpenAI-compatible HTTP API over the swarm."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from swarm import AutoDistributedModelForCausalLM, load_tokenizer
from swarm.api.app import Gateway, build_app
from swarm.api.generation import Generator
from swarm.api.prompts import PromptBuilder
from swarm.api.schemas import Limits
from swarm.compression import CODECS
from swarm.hub.source import default_model_id

READY = "OpenAI-compatible API at "  # printed once the model is loaded, right before the server starts listening


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(description="Serve an OpenAI-compatible API (/v1/completions, "
                                                 "/v1/chat/completions, /v1/models) over the swarm.")
    parser.add_argument("model", nargs="?", default=None,
                        help="local directory or hub name (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm node")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients use (default: the hub name or the local directory's name)")
    parser.add_argument("--model-id", default=None, help="the model's DHT name, if it differs from the default")
    parser.add_argument("--compression", choices=sorted(CODECS), default="blockwise8",
                        help="wire codec of hidden states between servers (none: bit-exact)")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="generations running at once (each holds an inference session); more wait their turn")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longest prompt accepted, in tokens")
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="most choices (n) per prompt")
    return parser


class Server(uvicorn.Server):
    """uvicorn's server, which first stops the generations in flight when told to exit: their streams then end at
    once (with an error event) instead of being cut at the end of the grace period."""

    def __init__(self, config: uvicorn.Config, generator: Generator):
        super().__init__(config)
        self.generator = generator

    def handle_exit(self, sig: int, frame) -> None:
        self.generator.cancel_all()
        super().handle_exit(sig, frame)


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=os.environ.get("SWARM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    for name, value in (("--max-concurrency", args.max_concurrency), ("--max-tokens", args.max_tokens),
                        ("--max-prompt-tokens", args.max_prompt_tokens), ("--max-n", args.max_n)):
        if value < 1:
            raise SystemExit(f"{name} must be at least 1, got {value}")

    tokenizer = load_tokenizer(args.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            model_id=args.model_id, compression=args.compression)
    generator = Generator(model, tokenizer, args.max_concurrency)
    try:
        limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n)
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        names = [args.served_model_name or default_model_id(args.model)]
        if args.model is not None:
            names.append(str(args.model))  # also accepted as typed on the command line
        gateway = Gateway(generator, PromptBuilder(tokenizer, limits, context), names, limits)
        # In-flight requests get a few seconds to end at shutdown; the app's shutdown then closes the generator.
        config = uvicorn.Config(build_app(gateway), host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=5)
        print(f"{READY}http://{args.host}:{args.port}/v1 serving {names[0]}", flush=True)
        Server(config, generator).run()
    finally:
        generator.close()  # done already by the app's shutdown, unless it never started


if __name__ == "__main__":
    main()
