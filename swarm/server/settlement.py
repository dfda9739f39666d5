"""A server's side of settlement (``--settlement NAME``): a signed receipt in every step reply, and the client's
countersigned receipts handed to the background worker, which records and settles them in batches.

Nothing here waits on the backend: issuing is one signature, accepting a receipt is a few comparisons (the worker
checks the signatures), and settling happens on the worker's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from swarm.dht.identity import Identity
from swarm.rpc.protocol import RequestError
from swarm.server.sessions import ServerSession
from swarm.settlement import Receipt, ReceiptError, SettlementWorker, issue, load_backend
from swarm.utils.cache import cache_path

logger = logging.getLogger(__name__)

PAYMENT_GRACE = 64  # steps a paying session may run past its last countersigned receipt (clients send every 16)


class SessionSettlement:
    def __init__(self, backend_name: str, options: Mapping[str, str], identity: Identity, model_id: str,
                 price: int, period: float = 1.0, require_payment: bool = False):
        self.backend = load_backend(backend_name, options)
        self.backend.bind_identity(identity)
        where = self.backend.check_can_settle()
        self.identity, self.model_id, self.price = identity, model_id, price
        self.backend_name, self.require_payment = backend_name, require_payment
        self.payee = self.backend.payee()
        logger.info(f"Settlement on: {where}; price {price} per token (batch row x position), receipts name "
                    f"{self.payee or identity.peer_id}")
        # countersigned receipts are journaled before the step that carried them is answered (settlement/worker.py)
        journal = cache_path(f"receipts-{identity.peer_id}.journal")
        self.worker = SettlementWorker(self.backend, self.payee or identity.peer_id, period, journal)
        self.accepted_seq: dict[str, int] = {}  # session id -> seq of the last countersigned receipt taken

    def check_open(self, message: dict) -> None:
        """With ``--require-payment``, a session opens only for a client that settles with this backend."""
        if self.require_payment and message.get("settlement") != self.backend_name:
            raise RequestError(f"payment required: this server serves only clients that settle with "
                               f"{self.backend_name!r} (from_pretrained(..., settlement={self.backend_name!r}))")

    def check_paid(self, session: ServerSession) -> None:
        """With ``--require-payment``, a session whose client stopped countersigning is refused further steps (it
        is allowed ``PAYMENT_GRACE`` steps past its last countersigned receipt)."""
        if self.require_payment and session.steps - self.accepted_seq.get(session.session_id, 0) > PAYMENT_GRACE:
            raise RequestError(f"payment required: no countersigned receipt for {PAYMENT_GRACE} steps; this "
                               f"session is served again once its client countersigns one")

    def issue(self, session: ServerSession) -> dict:
        """This session's usage so far, signed: sent with each step reply."""
        return issue(self.identity, session.peer, self.model_id, session.start, session.end,
                     session.tokens_processed, self.price, session.session_id, session.steps, self.payee).to_wire()

    def accept(self, session: ServerSession, message: object) -> None:
        """A countersigned receipt from the session's client (with a step or its close): queued for settlement if it
        is about this session and newer than the last one taken. A bad one is dropped; the session goes on."""
        try:
            receipt = Receipt.from_wire(message)
            if (receipt.server, receipt.client, receipt.session_id) != (self.identity.peer_id, session.peer,
                                                                        session.session_id):
                raise ReceiptError("the receipt is not about this session")
            if receipt.seq <= self.accepted_seq.get(session.session_id, 0) or receipt.seq > session.steps:
                raise ReceiptError(f"receipt seq {receipt.seq} is stale or not issued yet")
            if receipt.tokens > session.tokens_processed or receipt.price != self.price:
                raise ReceiptError("the receipt does not match what this server issued")
        except ReceiptError as e:
            logger.info(f"Dropped a receipt from {session.peer[-8:]}: {e}")
            return
        self.accepted_seq[session.session_id] = receipt.seq
        self.worker.submit(receipt)

    def finish(self, session: ServerSession) -> None:
        self.accepted_seq.pop(session.session_id, None)

    def stats(self) -> dict:
        return {**self.worker.stats, "price": self.price, "payee": self.payee}

    def stop(self) -> None:
        self.worker.stop()
