"""Settlement of served work, as a plugin: the swarm runs without it, and backends are chosen by name.

receipts.py - Receipt (what a server computed for a client, signed by both) and ReceiptBook (the client's checks);
plugin.py - SettlementBackend, the interface, and load_backend (entry point group ``swarm.settlement``);
ledger.py - the ``ledger`` backend: a local hash-chained SQLite ledger;
evm.py + escrow.vy - the ``evm`` backend: a Vyper escrow contract driven with web3;
worker.py - SettlementWorker, which records and settles receipts in batches off the inference path.
"""

from swarm.settlement.plugin import SettlementBackend, available_backends, load_backend, parse_options
from swarm.settlement.receipts import Receipt, ReceiptBook, ReceiptError, issue
from swarm.settlement.worker import SettlementWorker

__all__ = ["Receipt", "ReceiptBook", "ReceiptError", "SettlementBackend", "SettlementWorker", "available_backends",
           "issue", "load_backend", "parse_options"]
