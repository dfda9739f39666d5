"""``python -m swarm.api [MODEL] --initial-peers MADDR`` (or ``swarm-api``): an OpenAI-compatible HTTP API over the
swarm.

Arguments are parsed before torch, transformers and uvicorn are imported, so ``--help`` and argument mistakes
answer at once.
"""

from __future__ import annotations

from swarm.api.schemas import Limits
from swarm.hub.source import check_model_name
from swarm.utils.cli import Parser, entry_point, host, port, positive, setup_logging

READY = "OpenAI-compatible API at "  # printed once the model is loaded, right before the server starts listening
# The wire codecs (swarm.compression.CODECS, which imports torch; tests/test_cli.py checks that they agree)
CODEC_NAMES = ("bfloat16", "blockwise8", "float16", "none")


def build_parser() -> Parser:
    defaults = Limits()
    parser = Parser("swarm.api", "Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                                 "/v1/models) over the swarm.", initial_peers=True)
    parser.add_model()
    network = parser.add_argument_group("swarm and network")
    parser.add_initial_peers(network, required=True)
    network.add_argument("--host", type=host, default="127.0.0.1",
                         help="interface to listen on (0.0.0.0: every interface)")
    network.add_argument("--port", type=port, default=8080, help="TCP port")
    network.add_argument("--compression", choices=CODEC_NAMES, default="blockwise8",
                         help="wire codec of hidden states between servers (none: bit-exact)")
    names = parser.add_argument_group("model names")
    names.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: the hub name or the local directory's name)")
    names.add_argument("--model-id", default=None, help="the model's DHT name, if it differs from the default")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-concurrency", type=positive(int), default=8, metavar="N",
                        help="generations running at once (each holds an inference session); more wait their turn")
    limits.add_argument("--max-tokens", type=positive(int), default=defaults.max_tokens, metavar="N",
                        help="largest max_tokens a request may ask for")
    limits.add_argument("--max-prompt-tokens", type=positive(int), default=defaults.max_prompt_tokens, metavar="N",
                        help="longest prompt accepted, in tokens")
    limits.add_argument("--max-n", type=positive(int), default=defaults.max_n, metavar="N",
                        help="most choices (n) per prompt")
    return parser


@entry_point
def main() -> None:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    check_model_name(args.model)  # a mistyped model fails now, not after torch has loaded

    import uvicorn  # the heavy part starts here, once the arguments are known to be good

    from swarm import AutoDistributedModelForCausalLM, load_tokenizer
    from swarm.api.app import Gateway, build_app
    from swarm.api.generation import Generator
    from swarm.api.prompts import PromptBuilder
    from swarm.hub.source import default_model_id

    class Server(uvicorn.Server):
        """uvicorn's server, which first stops the generations in flight when told to exit: their streams then end
        at once (with an error event) instead of being cut at the end of the grace period."""

        def handle_exit(self, sig: int, frame) -> None:
            generator.cancel_all()
            super().handle_exit(sig, frame)

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
        config = uvicorn.Config(build_app(gateway), host=args.host, port=args.port, log_level=args.log_level.lower(),
                                timeout_graceful_shutdown=5)
        print(f"{READY}http://{args.host}:{args.port}/v1 serving {names[0]}", flush=True)
        Server(config).run()
    finally:
        generator.close()  # done already by the app's shutdown, unless it never started


if __name__ == "__main__":
    main()
