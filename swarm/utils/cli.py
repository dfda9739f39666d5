"""What every command line shares (``python -m swarm.server``, ``swarm.dht``, ``swarm.health``, ``swarm.api``,
``swarm.chat`` and their console scripts ``swarm-server``, ...).

- ``Parser``: named as the user ran it, options in groups with their defaults shown, ``--log-level`` (default
  ``$SWARM_LOG_LEVEL``), Petals' underscore spellings accepted (``--initial_peers``, ``--num_blocks``, ...: made from
  the dashed names, so none is forgotten, and kept out of ``--help``), ``--initial-peers`` defaulting to
  ``$SWARM_INITIAL_PEERS`` and checked up front, and argument mistakes as one line.
- ``entry_point``: runs a ``main()`` so that a ``UserError`` is one ``error: ...`` line on stderr (exit 1) instead
  of a traceback, and Ctrl-C exits quietly with 130.

Light on purpose (no torch, transformers or hivemind): ``--help`` and argument mistakes answer at once, because each
entry point imports its heavy modules only after parsing.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import ipaddress
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from swarm.utils.errors import UserError
from swarm.utils.multiaddrs import ENV_INITIAL_PEERS, BadMultiaddr, check_maddr, looks_like_maddr, split_maddrs

ENV_LOG_LEVEL = "SWARM_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MODEL_HELP = "local directory or hub name (default: the embedded HuggingFaceTB/SmolLM2-135M-Instruct)"


def program_name(module: str) -> str:
    """``swarm-server`` when run as that console script, else ``python -m swarm.server`` (not ``__main__.py``)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith("swarm-") else f"python -m {module}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless there is nothing to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or default is None or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with the conventions above. Add options as usual (in groups: ``add_argument_group``);
    ``add_model``, ``add_initial_peers`` and ``add_maddrs`` add the shared ones."""

    def __init__(self, module: str, description: str, *, log_level: str = "INFO", initial_peers: bool = False):
        environment = [(ENV_LOG_LEVEL, "default of --log-level")]
        environment += [(ENV_INITIAL_PEERS, "default of --initial-peers")] if initial_peers else []
        environment += [("SWARM_CACHE", "state directory (default: ~/.cache/swarm)")]
        epilog = "\n".join(["environment:", *(f"  {name:<21} {text}" for name, text in environment),
                            "", "Options may also be spelled with underscores, as in Petals (--initial_peers, ...)."])
        super().__init__(prog=program_name(module), description=description, epilog=epilog,
                         formatter_class=HelpFormatter)
        self.aliases: dict[str, str] = {}  # extra spellings: alias -> option (e.g. Petals' --block_indices)
        self.peers: tuple[str, bool] | None = None  # (dest, required) of --initial-peers
        self.maddrs: dict[str, tuple[str, bool]] = {}  # dest -> (option, needs a peer id) of other address lists
        self.default_log_level = log_level
        self.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None, metavar="LEVEL",
                          help=f"what to log: {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]} "
                               f"(default: ${ENV_LOG_LEVEL}, else {log_level})")

    # ---- shared options

    def add_model(self, group: argparse._ActionsContainer | None = None) -> None:
        """The optional positional MODEL (``--initial-peers MADDR MODEL`` works too, see ``_finish``)."""
        (group or self).add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)

    def add_initial_peers(self, group: argparse._ActionsContainer | None = None, *, required: bool,
                          help: str = "multiaddrs of any swarm node") -> None:
        """``--initial-peers MADDR ...``: ``$SWARM_INITIAL_PEERS`` when not given. Unless ``required`` (a node that
        may start a new swarm), also ``--new-swarm``: none even if the variable is set."""
        suffix = f" (default: ${ENV_INITIAL_PEERS}{'' if required else ', else none'})"
        if not required:
            group = (group or self).add_mutually_exclusive_group()
        (group or self).add_argument("--initial-peers", nargs="+" if required else "*", default=None,
                                     metavar="MADDR", help=help + suffix)
        if not required:
            group.add_argument("--new-swarm", action="store_true",
                               help=f"start a new swarm even if ${ENV_INITIAL_PEERS} is set")
        self.peers = ("initial_peers", required)

    def add_maddrs(self, group: argparse._ActionsContainer | None, option: str, *, help: str,
                   need_peer_id: bool = False) -> None:
        """An option taking multiaddrs (e.g. ``--announce-maddrs``), checked like ``--initial-peers``."""
        (group or self).add_argument(option, nargs="+", default=None, metavar="MADDR", help=help)
        self.maddrs[option[2:].replace("-", "_")] = (option, need_peer_id)

    def add_alias(self, alias: str, option: str) -> None:
        """Accept ``alias`` for ``option`` (hidden from --help)."""
        self.aliases[alias] = option

    # ---- parsing

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = self._spell(list(sys.argv[1:] if args is None else args))
        self._args = args  # for error(): argparse reports a missing option before an unknown one
        namespace, extras = super().parse_known_args(args, namespace)
        self._finish(namespace)
        return namespace, extras

    def _options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def _spell(self, args: list[str]) -> list[str]:
        """Petals' spellings (and explicit aliases) rewritten to ours, before argparse sees them."""
        table = {"--" + option[2:].replace("-", "_"): option for option in self._options() if "-" in option[2:]}
        table.update(self.aliases)
        spelled = []
        for index, arg in enumerate(args):
            if arg == "--":  # the rest is positional, whatever it looks like
                return spelled + args[index:]
            name, sep, value = arg.partition("=")
            spelled.append(table[name] + sep + value if name in table else arg)
        return spelled

    def _finish(self, namespace: argparse.Namespace) -> None:
        level = namespace.log_level or os.environ.get(ENV_LOG_LEVEL, "").strip().upper() or self.default_log_level
        if level not in LOG_LEVELS:
            self.error(f"{ENV_LOG_LEVEL}={os.environ.get(ENV_LOG_LEVEL)!r} is not a log level "
                       f"(one of {', '.join(LOG_LEVELS)})")
        namespace.log_level = level
        try:
            if self.peers is not None:
                self._finish_peers(namespace, *self.peers)
            for dest, (option, need_peer_id) in self.maddrs.items():
                if getattr(namespace, dest, None):
                    setattr(namespace, dest, [check_maddr(value, what=option, need_peer_id=need_peer_id)
                                              for value in getattr(namespace, dest)])
        except BadMultiaddr as e:
            self.error(str(e))

    def _finish_peers(self, namespace: argparse.Namespace, dest: str, required: bool) -> None:
        given = getattr(namespace, dest)
        if given is not None:
            given = [part for value in given for part in split_maddrs(value)]
            # "--initial-peers MADDR MODEL": the list option swallowed the positional model; give it back.
            if given and getattr(namespace, "model", "") is None and not looks_like_maddr(given[-1]):
                namespace.model = given.pop()
        what = "--initial-peers"
        if getattr(namespace, "new_swarm", False):
            given = []
        elif given is None:
            given, what = split_maddrs(os.environ.get(ENV_INITIAL_PEERS, "")), ENV_INITIAL_PEERS
        if required and not given:
            self.error(f"--initial-peers is required: the multiaddr of any node of the swarm (a server or "
                       f"`python -m swarm.dht` prints it), or set {ENV_INITIAL_PEERS}")
        setattr(namespace, dest, [check_maddr(value, what=what) for value in given])

    def error(self, message: str) -> NoReturn:
        """One line (argparse prints the whole usage first, dozens of lines for the server), naming an unknown
        option first: "--bloks 0:2" is a typo, not a missing --blocks."""
        options = self._options()
        unknown = [arg.split("=")[0] for arg in getattr(self, "_args", []) if arg.startswith("--")
                   and not any(option.startswith(arg.split("=")[0]) for option in options)]
        if unknown or message.startswith("unrecognized arguments: "):
            words = unknown or message.split(": ", 1)[1].split()
            message = "unrecognized arguments: " + " ".join(words)
            guesses = [match[0] if len(words) == 1 else f"{match[0]} for {word}" for word in words
                       if word.startswith("--") and (match := difflib.get_close_matches(word, options, 1))]
            if guesses:
                message += f" (did you mean {', '.join(guesses)}?)"
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


# ---- argument types


def positive(kind: Callable[[str], int | float]) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` (int or float) above zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def port(text: str) -> int:
    """An argparse type: a TCP port (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 0..65535, got {value}")
    return value


def host(text: str) -> str:
    """An argparse type: an interface to listen on, as an IP address (or localhost)."""
    if text != "localhost":
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an IP address such as 0.0.0.0 or 127.0.0.1, "
                                             f"got {text!r}") from None
    return text


# ---- running


def setup_logging(level: str, handler: logging.Handler | None = None) -> None:
    """Root logging at ``level`` (to ``handler``, else stderr); hivemind's chatter stays at warnings unless
    debugging."""
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=[handler] if handler else None, force=True)
    if handler is not None:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("hivemind").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


_interrupted = threading.Event()


def _on_sigint(signum: int, frame: object) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def interrupt_requested() -> bool:
    """Whether Ctrl-C (SIGINT) came since the command started or since :func:`clear_interrupt`. Python turns it
    into ``KeyboardInterrupt``, but a library's bare ``except:`` (during an import, in a ``__del__``) can swallow
    that: code that must stop on Ctrl-C checks this too."""
    return _interrupted.is_set()


def clear_interrupt() -> None:
    _interrupted.clear()


def entry_point(main: Callable[[], None]) -> Callable[[], None]:
    """``main`` with user mistakes as one line: ``UserError`` -> ``error: ...`` on stderr and exit 1 (the
    traceback too at DEBUG level); Ctrl-C -> exit 130 without a traceback, and remembered (interrupt_requested)."""

    @functools.wraps(main)
    def run() -> None:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)
        try:
            main()
        except KeyboardInterrupt:
            sys.exit(130)
        except UserError as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return run
