"""Settlement off the inference path: countersigned receipts are queued, and a thread records and settles them in
batches every ``period`` seconds. Serving never waits on a ledger or a chain; ``submit`` only appends the receipt to
a journal file (one write, which survives the process being killed) and puts it into a queue. At start, receipts
left in the journal by a run that died before settling them are settled first (those already settled are refused
by the backend as replays and skipped)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import msgpack

from swarm.settlement.plugin import SettlementBackend
from swarm.settlement.receipts import Receipt, ReceiptError

logger = logging.getLogger(__name__)

JOURNAL_COMPACT_BYTES = 1 << 20  # the journal is cut back to the unsettled receipts once it grows past this


class SettlementWorker:
    def __init__(self, backend: SettlementBackend, account: str, period: float = 1.0,
                 journal: str | os.PathLike | None = None):
        self.backend, self.account, self.period = backend, account, period
        self.inbox: queue.Queue[Receipt | None] = queue.Queue()
        # What info reports; updated by the thread only.
        self.stats = {"backend": backend.name, "account": account, "earnings": 0, "credited": 0,
                      "receipts_settled": 0, "receipts_rejected": 0, "batches": 0, "errors": 0, "recovered": 0}
        self.journal = Path(journal) if journal is not None else None
        self.journal_lock = threading.Lock()  # appends (serving threads) against compaction (the worker)
        self._fd: int | None = None
        if self.journal is not None:
            self._recover()
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.thread = threading.Thread(target=self._run, name="settlement", daemon=True)
        self.thread.start()

    def submit(self, receipt: Receipt) -> None:
        if self._fd is not None:
            with self.journal_lock:
                self._journal(receipt)
        self.inbox.put(receipt)

    def _journal(self, receipt: Receipt) -> None:
        """Append one length-prefixed record (under ``journal_lock``)."""
        record = msgpack.packb(receipt.to_wire())
        os.write(self._fd, len(record).to_bytes(4, "big") + record)

    def _recover(self) -> None:
        """Settle what an earlier run journaled and may not have settled, then start the journal afresh."""
        receipts = list(read_journal(self.journal)) if self.journal.exists() else []
        recorded = 0
        for receipt in receipts:
            try:
                self.backend.record_receipt(receipt)
                recorded += 1
            except ReceiptError:  # settled before the earlier run ended: nothing to recover
                pass
        if recorded:
            self.backend.settle()  # raises if the backend cannot settle now: the journal is kept for the next try
            self.stats["recovered"] = recorded
            logger.info(f"Settled {recorded} receipt(s) journaled by an earlier run that ended before settling them")
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.journal.write_bytes(b"")

    def stop(self, timeout: float = 30.0) -> None:
        """Settle what is queued, then end the thread."""
        self.inbox.put(None)
        self.thread.join(timeout)
        if self._fd is not None and not self.thread.is_alive():
            with self.journal_lock:  # everything was settled: nothing to recover at the next start
                os.ftruncate(self._fd, 0)
                os.close(self._fd)
                self._fd = None
        self.backend.close()

    def _compact(self) -> None:
        """Cut the journal back to the receipts still queued (the rest are settled)."""
        if self._fd is None or os.fstat(self._fd).st_size < JOURNAL_COMPACT_BYTES:
            return
        with self.journal_lock:
            queued = []
            while True:
                try:
                    queued.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            os.ftruncate(self._fd, 0)
            for item in queued:
                if item is not None:
                    self._journal(item)
                self.inbox.put(item)

    def _run(self) -> None:
        try:  # earnings from earlier runs (a reopened ledger, the chain), before any new receipt
            self.stats["earnings"] = self.backend.balance(self.account)
        except Exception:
            logger.warning("Could not read this server's earnings yet", exc_info=True)
        stopping = False
        while not stopping:
            batch: list[Receipt] = []
            item = self.inbox.get()
            # a batch: what arrives within ``period`` of its first receipt (or until stop), settled at once
            deadline = time.monotonic() + self.period
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                try:
                    item = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._settle(batch)

    def _settle(self, batch: list[Receipt]) -> None:
        recorded = 0
        for receipt in batch:
            try:
                self.backend.record_receipt(receipt)
                recorded += 1
            except ReceiptError as e:
                self.stats["receipts_rejected"] += 1
                logger.warning(f"Refused a receipt of session {receipt.session_id[:8]} from {receipt.client[-8:]}: "
                               f"{e}")
            except Exception:
                self.stats["errors"] += 1
                logger.exception("Recording a receipt failed")
        try:
            if recorded:
                self.stats["credited"] += self.backend.settle()
                self.stats["receipts_settled"] += recorded
                self.stats["batches"] += 1
                self._compact()
            self.stats["earnings"] = self.backend.balance(self.account)
        except Exception:  # a chain that is down: the receipts stay queued in the backend for the next batch
            self.stats["errors"] += 1
            logger.exception("Settling a batch failed")


def read_journal(path: Path):
    """The receipts in a journal, in order; a record cut short by a kill ends it."""
    data = path.read_bytes()
    offset = 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        if offset + 4 + size > len(data):
            break
        try:
            yield Receipt.from_wire(msgpack.unpackb(data[offset + 4:offset + 4 + size]))
        except (ReceiptError, ValueError, TypeError, msgpack.exceptions.ExtraData):
            logger.warning(f"Skipped an unreadable receipt in {path}")
        offset += 4 + size
