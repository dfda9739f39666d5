"""Usage receipts: what a server says it computed for a client, signed by the server and countersigned by the client.

A receipt is cumulative: receipt ``seq`` of a session states the tokens (batch rows x new positions, replays
included) that session has processed so far. Settling a session's receipts therefore pays ``tokens x price`` once,
however many of its receipts are submitted: a backend credits only the increase over the last receipt it settled for
that session (``session_key``), and refuses a receipt whose ``seq`` it has already seen (replay).

The server signs ``body()`` with its libp2p key; the client countersigns the same bytes with its own libp2p key
after checking, in ``ReceiptBook``, that the tokens claimed do not exceed what it sent that server. Backends may add
their own proof (the EVM backend: an EIP-191 signature over the amount) in ``extra``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import msgpack

from swarm.dht.identity import Identity, peer_id_of, verify

if TYPE_CHECKING:
    from swarm.settlement.plugin import SettlementBackend

VERSION = "swarm-receipt/1"  # domain separation: these bytes can never be another message the keys sign
COUNTERSIGN = b"countersign/"


class ReceiptError(ValueError):
    """A receipt that must not be accepted: forged, replayed, inflated or malformed."""


@dataclass(frozen=True)
class Receipt:
    server: str  # server's peer id (libp2p, base58)
    client: str  # client's peer id: the caller of the session
    model: str  # DHT name of the model
    start: int  # block span of the session
    end: int
    tokens: int  # cumulative batch rows x new positions computed in this session, replays included
    price: int  # per token, in the backend's smallest unit (wei for the EVM backend)
    session_id: str  # the server's id of the session (uuid4 hex: unique per session)
    seq: int  # the session's step count when issued: strictly increasing within a session
    time: float  # when issued (unix seconds)
    payee: str = ""  # where the server is paid, if not its peer id (the EVM backend: its address)
    server_key: bytes = b""  # DER public keys and signatures over body()
    server_sig: bytes = b""
    client_key: bytes = b""
    client_sig: bytes = b""
    extra: dict = field(default_factory=dict, compare=False)  # backend-specific countersignature parts

    @property
    def amount(self) -> int:
        return self.tokens * self.price

    def body(self) -> bytes:
        return msgpack.packb([VERSION, self.server, self.client, self.model, self.start, self.end, self.tokens,
                              self.price, self.session_id, self.seq, self.time, self.payee])

    def session_key(self) -> bytes:
        """32 bytes naming the (server, session) pair: the unit of replay protection in every backend."""
        return hashlib.sha256(f"{VERSION}/{self.server}/{self.session_id}".encode()).digest()

    def signed_by_server(self, identity: Identity) -> Receipt:
        if identity.peer_id != self.server:
            raise ValueError("a receipt is signed by the server it names")
        return replace(self, server_key=identity.public_key, server_sig=identity.sign(self.body()))

    def countersigned(self, identity: Identity, extra: dict | None = None) -> Receipt:
        if identity.peer_id != self.client:
            raise ValueError("a receipt is countersigned by the client it names")
        return replace(self, client_key=identity.public_key, client_sig=identity.sign(COUNTERSIGN + self.body()),
                       extra=dict(extra or {}))

    def check_signatures(self) -> None:
        """Raise ReceiptError unless both keys belong to the peers named and both signatures hold."""
        if peer_id_of(self.server_key) != self.server or not verify(self.server_key, self.body(), self.server_sig):
            raise ReceiptError("the server's signature does not hold")
        if peer_id_of(self.client_key) != self.client or not verify(self.client_key, COUNTERSIGN + self.body(),
                                                                    self.client_sig):
            raise ReceiptError("the client's countersignature does not hold")

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, message: object) -> Receipt:
        """Parse a receipt from the network, checking field types (unknown fields are ignored)."""
        if not isinstance(message, dict):
            raise ReceiptError("a receipt must be a map")
        values = {}
        for name, spec in cls.__dataclass_fields__.items():
            kind = {"str": str, "int": int, "float": float, "bytes": bytes, "dict": dict}[str(spec.type)]
            if name not in message:
                if name in ("server", "client", "model", "start", "end", "tokens", "price", "session_id", "seq",
                            "time"):
                    raise ReceiptError(f"receipt field {name!r} is missing")
                continue
            value = message[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ReceiptError(f"receipt field {name!r} must be {kind.__name__}")
            if kind is int and value < 0:
                raise ReceiptError(f"receipt field {name!r} must not be negative")
            values[name] = value
        return cls(**values)


def issue(identity: Identity, client: str, model: str, start: int, end: int, tokens: int, price: int,
          session_id: str, seq: int, payee: str = "") -> Receipt:
    """A receipt for ``tokens`` of a session, signed by the server holding ``identity``."""
    receipt = Receipt(identity.peer_id, client, model, start, end, tokens, price, session_id, seq, time.time(), payee)
    return receipt.signed_by_server(identity)


class ReceiptBook:
    """The client's side of one session on one server: counts what it sent, keeps the latest receipt it can accept,
    and countersigns it.

    ``count(step_id, tokens)`` is called once per step the server answered (relayed or pushed: the same step id is
    counted once), before ``offer`` of that reply's receipt.
    """

    def __init__(self, server: str, client: str, model: str, start: int, end: int, session_id: str,
                 max_price: int | None = None):
        self.server, self.client, self.model, self.start, self.end = server, client, model, start, end
        self.session_id, self.max_price = session_id, max_price
        self.steps: dict[int, int] = {}  # step id -> batch x new positions it carried
        self.sent = 0  # tokens the server may claim so far
        self.latest: Receipt | None = None  # the latest acceptable receipt
        self.countersigned_seq = -1
        self.rejected: list[str] = []  # why receipts were refused (shown in logs and tests)

    def count(self, step_id: int, tokens: int) -> None:
        if step_id not in self.steps:
            self.steps[step_id] = tokens
            self.sent += tokens

    def offer(self, message: object) -> Receipt | None:
        """Check a receipt from a step reply (the cheap checks; the signature is checked when countersigning);
        keep it if acceptable. Returns it, or None if refused."""
        try:
            receipt = Receipt.from_wire(message)
            self.check(receipt)
        except ReceiptError as e:
            self.rejected.append(str(e))
            return None
        self.latest = receipt
        return receipt

    def check(self, receipt: Receipt) -> None:
        expected = {"server": self.server, "client": self.client, "model": self.model, "start": self.start,
                    "end": self.end, "session_id": self.session_id}
        for name, value in expected.items():
            if getattr(receipt, name) != value:
                raise ReceiptError(f"receipt names {name} {getattr(receipt, name)!r}, expected {value!r}")
        if receipt.tokens > self.sent:
            raise ReceiptError(f"receipt claims {receipt.tokens} tokens, but only {self.sent} were sent")
        if self.latest is not None and receipt.seq <= self.latest.seq:
            raise ReceiptError(f"receipt seq {receipt.seq} is not after {self.latest.seq} (replayed)")
        if self.max_price is not None and receipt.price > self.max_price:
            raise ReceiptError(f"receipt price {receipt.price} exceeds the client's max_price {self.max_price}")

    def due(self, interval: int) -> bool:
        """Whether the latest receipt is ``interval`` or more steps past the last one countersigned."""
        return self.latest is not None and self.latest.seq - self.countersigned_seq >= interval

    def countersign(self, identity: Identity, backend: SettlementBackend) -> dict | None:
        """The latest acceptable receipt, countersigned (with the backend's own proof), ready to send; None if there
        is none or its server signature does not hold."""
        receipt = self.latest
        if receipt is None:
            return None
        if peer_id_of(receipt.server_key) != receipt.server or not verify(receipt.server_key, receipt.body(),
                                                                          receipt.server_sig):
            self.rejected.append(f"receipt seq {receipt.seq}: the server's signature does not hold")
            self.latest = None
            return None
        self.countersigned_seq = receipt.seq
        return receipt.countersigned(identity, backend.countersign_extra(receipt)).to_wire()
