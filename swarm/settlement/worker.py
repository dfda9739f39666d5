"""Settlement off the inference path: countersigned receipts are queued, and a thread records and settles them in
batches every ``period`` seconds. Serving never waits on a ledger or a chain; ``submit`` only puts into a queue."""

from __future__ import annotations

import logging
import queue
import threading

from swarm.settlement.plugin import SettlementBackend
from swarm.settlement.receipts import Receipt, ReceiptError

logger = logging.getLogger(__name__)


class SettlementWorker:
    def __init__(self, backend: SettlementBackend, account: str, period: float = 1.0):
        self.backend, self.account, self.period = backend, account, period
        self.inbox: queue.Queue[Receipt | None] = queue.Queue()
        # What info reports; updated by the thread only.
        self.stats = {"backend": backend.name, "account": account, "earnings": 0, "credited": 0,
                      "receipts_settled": 0, "receipts_rejected": 0, "batches": 0, "errors": 0}
        self.thread = threading.Thread(target=self._run, name="settlement", daemon=True)
        self.thread.start()

    def submit(self, receipt: Receipt) -> None:
        self.inbox.put(receipt)

    def stop(self, timeout: float = 30.0) -> None:
        """Settle what is queued, then end the thread."""
        self.inbox.put(None)
        self.thread.join(timeout)
        self.backend.close()

    def _run(self) -> None:
        try:  # earnings from earlier runs (a reopened ledger, the chain), before any new receipt
            self.stats["earnings"] = self.backend.balance(self.account)
        except Exception:
            logger.warning("Could not read this server's earnings yet", exc_info=True)
        stopping = False
        while not stopping:
            batch: list[Receipt] = []
            try:
                item = self.inbox.get(timeout=self.period)
                # take what else is queued, so one settle covers it all
                while True:
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
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
            self.stats["earnings"] = self.backend.balance(self.account)
        except Exception:  # a chain that is down: the receipts stay queued in the backend for the next batch
            self.stats["errors"] += 1
            logger.exception("Settling a batch failed")
