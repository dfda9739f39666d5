"""The ``ledger`` backend: a local append-only SQLite ledger whose entries are hash-chained.

Each entry stores the hash of the entry before it and its own hash over (that hash, its fields, the receipt it
came from). Rows are only ever inserted; ``verify`` walks the chain and re-checks every receipt's signatures, so an
edited, deleted or reordered row shows. A head row keeps the count and the last hash, signed with the server's key
when it runs the ledger: deleting the newest rows (which leaves a valid, shorter chain) shows too, and so does a
head rewritten to match them, unless whoever does it holds the server's key. It is the server's own bookkeeping of
countersigned usage: what a client owes and a server earned, with the receipts as proof.

Options: ``path`` (the SQLite file; default ``ledger.sqlite`` in the cache directory, ``$SWARM_CACHE`` or
``~/.cache/swarm``).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

import msgpack

from swarm.dht.identity import Identity, peer_id_of
from swarm.dht.identity import verify as verify_signature
from swarm.settlement.plugin import SettlementBackend
from swarm.settlement.receipts import Receipt, ReceiptError
from swarm.utils.cache import cache_path
from swarm.utils.errors import UserError

GENESIS = b"\x00" * 32

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,            -- 'credit' (a settled receipt) or 'withdraw'
    account TEXT NOT NULL,         -- who is credited or withdraws (the server's payee or peer id)
    counterparty TEXT NOT NULL,    -- who pays (the client's peer id); '' for withdrawals
    session_key BLOB,              -- Receipt.session_key(): replay protection
    seq INTEGER,
    amount INTEGER NOT NULL,       -- credited for this entry: the receipt's increase over the session's last one
    receipt BLOB,                  -- the countersigned receipt, msgpack
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
)
"""
HEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL,        -- entries in the chain
    hash BLOB NOT NULL,            -- the last entry's hash
    signer BLOB,                   -- public key (DER) of the server that signed it, or NULL
    signature BLOB
)
"""
HEAD_DOMAIN = b"swarm-ledger-head\x00"


def default_path() -> Path:
    return cache_path("ledger.sqlite")


class LedgerCorrupted(RuntimeError):
    """An entry does not match its hash or its receipt: the file was edited."""


class LedgerSettlement(SettlementBackend):
    name = "ledger"

    def __init__(self, options: Mapping[str, str] | None = None):
        super().__init__(options)
        self.path = self.options.get("path") or str(default_path())
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Used from the settlement worker's thread and read from others (tests, info): one lock around it.
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.lock = threading.Lock()
            with self.lock, self.db:
                self.db.execute(SCHEMA)
                self.db.execute(HEAD_SCHEMA)
                if self.db.execute("SELECT COUNT(*) FROM head").fetchone()[0] == 0:  # new, or from before heads
                    count, last = self.db.execute(
                        "SELECT COUNT(*), (SELECT hash FROM entries ORDER BY id DESC LIMIT 1) FROM entries").fetchone()
                    self.db.execute("INSERT INTO head VALUES (1, ?, ?, NULL, NULL)", (count, last or GENESIS))
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"cannot open the settlement ledger {self.path}: {e} (choose another file with "
                            f"--settlement-option path=FILE)") from e
        self.pending: dict[bytes, Receipt] = {}  # session key -> latest receipt queued for the next settle
        self.identity: Identity | None = None  # signs the head when a server runs the ledger

    def bind_identity(self, identity: Identity) -> None:
        self.identity = identity

    def check_can_settle(self) -> str:
        with self.lock:
            entries = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        return f"ledger {self.path} ({entries} entries)"

    def record_receipt(self, receipt: Receipt) -> None:
        receipt.check_signatures()
        key = receipt.session_key()
        last_seq, last_amount = self._settled(key)
        queued = self.pending.get(key)
        if queued is not None:
            last_seq = max(last_seq, queued.seq)
        if receipt.seq <= last_seq:
            raise ReceiptError(f"receipt seq {receipt.seq} of session {receipt.session_id[:8]} already settled "
                               f"(up to {last_seq}): replayed")
        if receipt.amount < last_amount:
            raise ReceiptError(f"receipt amount {receipt.amount} is below the {last_amount} already settled")
        self.pending[key] = receipt

    def settle(self) -> int:
        """Append every queued receipt, as one transaction."""
        credited, entries = 0, []
        with self.lock, self.db:
            for key, receipt in self.pending.items():
                _, last_amount = self._settled(key, locked=True)
                amount = receipt.amount - last_amount
                entries.append(("credit", receipt.payee or receipt.server, receipt.client, key, receipt.seq, amount,
                                msgpack.packb(receipt.to_wire())))
                credited += amount
            self._append(entries)
        self.pending.clear()
        return credited

    def balance(self, account: str | None = None) -> int:
        with self.lock:
            row = self.db.execute("SELECT COALESCE(SUM(CASE kind WHEN 'credit' THEN amount ELSE -amount END), 0) "
                                  "FROM entries WHERE account = ?", (account or self._default_account(),)).fetchone()
        return int(row[0])

    def spent(self, client: str) -> int:
        """What ``client`` owes in total, by its countersigned receipts."""
        with self.lock:
            row = self.db.execute("SELECT COALESCE(SUM(amount), 0) FROM entries WHERE kind = 'credit' AND "
                                  "counterparty = ?", (client,)).fetchone()
        return int(row[0])

    def withdraw(self, account: str | None = None) -> int:
        account = account or self._default_account()
        amount = self.balance(account)
        if amount > 0:
            with self.lock, self.db:
                self._append([("withdraw", account, "", None, None, amount, None)])
        return amount

    def verify(self, signer: str | None = None) -> int:
        """Walk the chain and check it against the head; returns the number of entries, or raises LedgerCorrupted
        naming the first bad one. ``signer``: the peer id whose signature the head must carry."""
        with self.lock:
            rows = self.db.execute("SELECT id, kind, account, counterparty, session_key, seq, amount, receipt, "
                                   "prev_hash, hash FROM entries ORDER BY id").fetchall()
            head = self.db.execute("SELECT count, hash, signer, signature FROM head WHERE id = 1").fetchone()
        previous = GENESIS
        for row in rows:
            entry_id, prev_hash, stored = row[0], row[8], row[9]
            if prev_hash != previous or _entry_hash(prev_hash, row[:8]) != stored:
                raise LedgerCorrupted(f"ledger entry {entry_id} does not match its hash chain")
            if row[1] == "credit":
                try:
                    receipt = Receipt.from_wire(msgpack.unpackb(row[7]))
                    receipt.check_signatures()
                except (ReceiptError, ValueError, TypeError) as e:
                    raise LedgerCorrupted(f"ledger entry {entry_id}: its receipt does not hold ({e})") from None
                if (receipt.payee or receipt.server, receipt.client, receipt.session_key()) != row[2:5]:
                    raise LedgerCorrupted(f"ledger entry {entry_id} does not match its receipt")
            previous = stored
        self._check_head(head, len(rows), previous, signer)
        return len(rows)

    @staticmethod
    def _check_head(head: tuple | None, count: int, last: bytes, signer: str | None) -> None:
        if head is None:
            raise LedgerCorrupted("the ledger's head row is missing")
        head_count, head_hash, key, signature = head
        if (head_count, head_hash) != (count, last):
            raise LedgerCorrupted(f"the chain has {count} entries, but the ledger's head records {head_count} "
                                  f"ending elsewhere: entries were deleted or added outside the ledger")
        if key is None:
            if signer is not None:
                raise LedgerCorrupted(f"the ledger's head is not signed (expected a signature of {signer})")
            return
        if not verify_signature(key, _head_message(head_count, head_hash), signature or b""):
            raise LedgerCorrupted("the ledger's head signature does not hold: the head was rewritten")
        if signer is not None and peer_id_of(key) != signer:
            raise LedgerCorrupted(f"the ledger's head is signed by {peer_id_of(key)}, not {signer}")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ---- helpers

    def _settled(self, key: bytes, locked: bool = False) -> tuple[int, int]:
        """(last seq, total amount) already settled for a session."""
        query = "SELECT COALESCE(MAX(seq), -1), COALESCE(SUM(amount), 0) FROM entries WHERE session_key = ?"
        if locked:
            row = self.db.execute(query, (key,)).fetchone()
        else:
            with self.lock:
                row = self.db.execute(query, (key,)).fetchone()
        return int(row[0]), int(row[1])

    def _append(self, entries: list[tuple]) -> None:
        """Chain ``entries`` (kind, account, counterparty, session key, seq, amount, receipt) after the last one and
        move the head past them, signed once for them all (inside the caller's transaction)."""
        if not entries:
            return
        last = self.db.execute("SELECT id, hash FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        entry_id, entry_hash = last if last else (0, GENESIS)
        for entry in entries:
            prev_hash, entry_id = entry_hash, entry_id + 1
            fields = (entry_id, *entry)
            entry_hash = _entry_hash(prev_hash, fields)
            self.db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (*fields, prev_hash, entry_hash))
        key = signature = None
        if self.identity is not None:
            key, signature = self.identity.public_key, self.identity.sign(_head_message(entry_id, entry_hash))
        self.db.execute("UPDATE head SET count = ?, hash = ?, signer = ?, signature = ? WHERE id = 1",
                        (entry_id, entry_hash, key, signature))

    def _default_account(self) -> str:
        account = self.options.get("account")
        if not account:
            raise ValueError("give an account (or the 'account' option)")
        return account


def _head_message(count: int, last_hash: bytes) -> bytes:
    return HEAD_DOMAIN + count.to_bytes(8, "big") + last_hash


def _entry_hash(prev_hash: bytes, fields: tuple) -> bytes:
    return hashlib.sha256(prev_hash + msgpack.packb(list(fields))).digest()
