"""The settlement plugin interface, and backends found by name through the ``swarm.settlement`` entry points.

A backend is a small class: ``record_receipt`` checks a countersigned receipt and queues it, ``settle`` pays the
queued ones in one batch, ``balance`` and ``withdraw`` are about a server's earnings. On the client it may add its
own proof to a countersignature (``countersign_extra``). Servers and clients only ever name a backend
(``--settlement NAME``, ``ClientConfig.settlement``): a third-party package adds one by declaring an entry point::

    [project.entry-points."swarm.settlement"]
    mychain = "mypackage.settlement:MyChainSettlement"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from swarm.settlement.receipts import Receipt
from swarm.utils.errors import UserError

if TYPE_CHECKING:
    from swarm.dht.identity import Identity

GROUP = "swarm.settlement"


class SettlementConfigError(UserError, ValueError):
    """An unknown backend name or a bad option: the user's to fix."""


class SettlementBackend(ABC):
    """One way of turning receipts into credit. Constructed from string options (``--settlement-option k=v``)."""

    name: str = ""

    def __init__(self, options: Mapping[str, str] | None = None):
        self.options = dict(options or {})

    # ---- server side

    def payee(self) -> str:
        """Where this server is paid, written into its receipts ("" : its peer id)."""
        return ""

    def bind_identity(self, identity: Identity) -> None:
        """The server's key, for a backend that signs its own records (the ledger signs its head); by default
        unused."""
        return None

    def check_can_settle(self) -> str:
        """Called once when a server starts: raise ``UserError`` (saying what to do) if settling would fail later
        (no file to write, a node that cannot be reached, a key that cannot pay gas); else return a short line for
        the start-up log saying where this backend records or pays."""
        return self.name

    @abstractmethod
    def record_receipt(self, receipt: Receipt) -> None:
        """Check a countersigned receipt (signatures, replay, that it raises what was settled) and queue it for the
        next ``settle``; raise ReceiptError if it must be refused."""

    @abstractmethod
    def settle(self) -> int:
        """Settle the queued receipts as one batch; returns the amount credited."""

    @abstractmethod
    def balance(self, account: str | None = None) -> int:
        """Earnings not yet withdrawn of ``account`` (default: this server's payee)."""

    @abstractmethod
    def withdraw(self, account: str | None = None) -> int:
        """Take out ``account``'s earnings (default: this server's); returns the amount withdrawn."""

    def close(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        """Release files or connections."""

    # ---- client side

    def countersign_extra(self, receipt: Receipt) -> dict:
        """Backend-specific proof added to the client's countersignature (e.g. a chain signature)."""
        return {}


def available_backends() -> dict[str, object]:
    """Installed backends: name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_backend(name: str, options: Mapping[str, str] | None = None) -> SettlementBackend:
    """An instance of the backend registered under ``name``."""
    found = available_backends()
    if name not in found:
        installed = ", ".join(sorted(found)) or "none"
        raise SettlementConfigError(f"unknown settlement backend {name!r}; installed: {installed} "
                                    f"(entry point group {GROUP!r})")
    backend_class = found[name].load()
    if not (isinstance(backend_class, type) and issubclass(backend_class, SettlementBackend)):
        raise TypeError(f"entry point {name!r} does not name a SettlementBackend subclass")
    return backend_class(options)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (from the command line) as a dict."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettlementConfigError(f"expected --settlement-option KEY=VALUE, got {pair!r}")
        options[key] = value
    return options
