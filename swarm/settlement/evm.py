"""The ``evm`` backend: receipts settled on an EVM chain through the Vyper escrow contract ``escrow.vy``.

The client deposits into the contract. With each countersignature it adds an EIP-191 signature over
``keccak256(abi_encode(contract, client address, server address, total wei, session key))``; the server submits
batches of these claims (``settle_batch``), the contract checks each signature and pays only a claim's increase over
what that session already paid (so a replay reverts), and the server withdraws its earnings when it likes.
The contract is compiled in-process with the ``vyper`` package; ``web3`` drives it over JSON-RPC, or over an
in-process py-evm chain when a ``Web3`` object is passed.

Options: ``rpc_url``, ``contract`` (the escrow's address), ``private_key`` (the server's account, which pays gas
and is paid; or the client's, which signs receipts), ``max_batch`` (claims per transaction, default 32).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from importlib.resources import files

from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import Web3
from web3.exceptions import ContractLogicError

from swarm.settlement.plugin import SettlementBackend
from swarm.settlement.receipts import Receipt, ReceiptError
from swarm.utils.errors import UserError

try:  # the in-process chain raises its own revert type; RPC nodes raise ContractLogicError
    from eth_tester.exceptions import TransactionFailed
except ImportError:  # eth-tester is only needed for the in-process chain
    TransactionFailed = ContractLogicError

REVERTS = (ContractLogicError, TransactionFailed)  # what a reverted call or transaction raises, on any chain

logger = logging.getLogger(__name__)


@cache
def compile_escrow() -> tuple[list, str]:
    """(ABI, bytecode hex) of the escrow contract, compiled once per process."""
    import vyper  # ~0.3 s to import and compile: only when a chain is used

    source = files("swarm.settlement").joinpath("escrow.vy").read_text()
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


def deploy_escrow(w3: Web3, private_key: str | bytes) -> str:
    """Deploy a new escrow from ``private_key``'s account; returns its address."""
    abi, bytecode = compile_escrow()
    return send(w3, private_key, w3.eth.contract(abi=abi, bytecode=bytecode).constructor()).contractAddress


def send(w3: Web3, private_key: str | bytes, call, value: int = 0):  # -> the transaction's receipt
    """Sign ``call`` (a contract function or constructor) locally and send it; raises one of REVERTS if it would
    revert or did."""
    account = Account.from_key(private_key)
    tx = call.build_transaction({"from": account.address, "value": value,
                                 "nonce": w3.eth.get_transaction_count(account.address, "pending")})
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt.status != 1:
        raise ContractLogicError(f"transaction {tx_hash.hex()} reverted")
    return receipt


def escrow_at(w3: Web3, address: str):  # -> web3 Contract
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=compile_escrow()[0])


def claim_digest(contract: str, client: str, server: str, total: int, key: bytes) -> bytes:
    """The 32 bytes a client signs (EIP-191 ``personal_sign``) to let ``server`` settle ``total`` for ``key``."""
    return Web3.keccak(encode(["address", "address", "address", "uint256", "bytes32"],
                              [contract, client, server, total, key]))


def sign_claim(private_key: str | bytes, contract: str, server: str, total: int, key: bytes) -> dict:
    account = Account.from_key(private_key)
    digest = claim_digest(contract, account.address, server, total, key)
    signed = Account.sign_message(encode_defunct(primitive=digest), account.key)
    return {"address": account.address, "total": total, "v": signed.v, "r": signed.r.to_bytes(32, "big"),
            "s": signed.s.to_bytes(32, "big")}


# Gas of one settle transaction of a full batch, rounded up: what a server must hold to be paid at all.
SETTLE_GAS = 1_000_000


class EVMSettlement(SettlementBackend):
    name = "evm"

    def __init__(self, options: Mapping[str, str] | None = None, w3: Web3 | None = None):
        super().__init__(options)
        self.account = Account.from_key(self.options["private_key"]) if self.options.get("private_key") else None
        self.contract_address = self.options.get("contract")
        self.max_batch = int(self.options.get("max_batch", 32))
        self._w3 = w3
        self.pending: dict[bytes, tuple[Receipt, dict]] = {}  # session key -> (receipt, its claim)

    @property
    def w3(self) -> Web3:
        if self._w3 is None:
            if not self.options.get("rpc_url"):
                raise ValueError("the evm backend needs an 'rpc_url' option")
            self._w3 = Web3(Web3.HTTPProvider(self.options["rpc_url"], request_kwargs={"timeout": 30}))
        return self._w3

    @property
    def escrow(self):  # -> web3 Contract
        if not self.contract_address:
            raise ValueError("the evm backend needs a 'contract' option (the escrow's address)")
        return escrow_at(self.w3, self.contract_address)

    def _own_address(self) -> str:
        if self.account is None:
            raise ValueError("the evm backend needs a 'private_key' option here")
        return self.account.address

    # ---- server side

    def payee(self) -> str:
        return self._own_address()

    def check_can_settle(self) -> str:
        """The node answers, the escrow is deployed where ``contract`` says, and the server's key holds enough to pay
        the gas of a settlement at today's gas price (a server that cannot pay would serve and never be paid)."""
        try:
            address, escrow = self._own_address(), self.escrow.address
            connected = self.w3.is_connected()
        except ValueError as e:  # a missing or malformed option
            raise UserError(f"settlement evm: {e}") from e
        if not connected:
            raise UserError(f"settlement evm: no Ethereum node answers at {self.options['rpc_url']}")
        if not self.w3.eth.get_code(escrow):
            raise UserError(f"settlement evm: no contract at {escrow} on {self.options['rpc_url']} (deploy the escrow "
                            f"first, see swarm/settlement/evm.py)")
        balance, needed = self.w3.eth.get_balance(address), self.w3.eth.gas_price * SETTLE_GAS
        if balance < needed:
            raise UserError(f"settlement evm: the server's account {address} holds {balance} wei, less than the "
                            f"{needed} wei one settlement costs in gas ({SETTLE_GAS} gas at {self.w3.eth.gas_price} "
                            f"wei): fund it first")
        return (f"evm escrow {escrow} via {self.options['rpc_url']}, paid to {address} (balance {balance} wei, about "
                f"{balance // max(needed, 1)} settlements of gas)")

    def record_receipt(self, receipt: Receipt) -> None:
        receipt.check_signatures()
        server = self._own_address()
        if receipt.payee != server:
            raise ReceiptError(f"receipt pays {receipt.payee!r}, not this server's address {server}")
        claim = self._read_claim(receipt)
        key = receipt.session_key()
        queued = self.pending.get(key)
        if queued is not None and receipt.seq <= queued[0].seq:
            raise ReceiptError(f"receipt seq {receipt.seq} is not after the queued {queued[0].seq}: replayed")
        if receipt.amount <= self.escrow.functions.settled(server, key).call():
            raise ReceiptError(f"session {receipt.session_id[:8]} already settled up to this amount: replayed")
        self.pending[key] = (receipt, claim)

    def _read_claim(self, receipt: Receipt) -> dict:
        """The claim the contract will check, after checking its client signature here (a bad one would revert the
        whole batch)."""
        extra = receipt.extra
        try:
            client, v, r, s = extra["address"], int(extra["v"]), bytes(extra["r"]), bytes(extra["s"])
            digest = claim_digest(self.escrow.address, client, receipt.payee, receipt.amount, receipt.session_key())
            signer = Account.recover_message(encode_defunct(primitive=digest), vrs=(v, r, s))
        except (KeyError, TypeError, ValueError) as e:
            raise ReceiptError(f"receipt has no valid chain signature ({e})") from None
        if signer != client:
            raise ReceiptError("the client's chain signature does not hold")
        return {"client": client, "total": receipt.amount, "key": receipt.session_key(), "v": v, "r": r, "s": s}

    def settle(self) -> int:
        """Submit the queued claims, ``max_batch`` per transaction; a batch that reverts is retried claim by claim
        so that one bad claim (e.g. a client whose deposit ran out) does not hold up the others."""
        server, escrow = self._own_address(), self.escrow
        before = escrow.functions.earnings(server).call()
        while self.pending:
            keys = list(self.pending)[:self.max_batch]
            batch = [self.pending[key][1] for key in keys]
            try:
                self._transact(escrow.functions.settle_batch(batch))
            except REVERTS as e:
                logger.info(f"Settling a batch of {len(batch)} reverted ({e}); settling them one by one")
                for claim in batch:
                    try:
                        self._transact(escrow.functions.settle(claim))
                    except REVERTS as e:
                        logger.warning(f"Claim of {claim['client']} refused by the contract: {e}")
            for key in keys:  # only now: after an error of another kind (a node down) they stay queued
                del self.pending[key]
        return escrow.functions.earnings(server).call() - before

    def balance(self, account: str | None = None) -> int:
        return self.escrow.functions.earnings(Web3.to_checksum_address(account or self._own_address())).call()

    def withdraw(self, account: str | None = None) -> int:
        if account not in (None, self._own_address()):
            raise ValueError("only the account holding the earnings can withdraw them")
        amount = self.balance()
        self._transact(self.escrow.functions.withdraw())
        return amount

    def _transact(self, call) -> None:
        self._own_address()
        send(self.w3, self.account.key, call)

    # ---- client side

    def countersign_extra(self, receipt: Receipt) -> dict:
        if not self.contract_address or self.account is None:
            raise ValueError("the evm backend needs 'contract' and 'private_key' options on the client")
        if not Web3.is_address(receipt.payee):
            raise ReceiptError(f"receipt names no payee address ({receipt.payee!r})")
        return sign_claim(self.account.key, Web3.to_checksum_address(self.contract_address),
                          Web3.to_checksum_address(receipt.payee), receipt.amount, receipt.session_key())

