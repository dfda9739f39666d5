"""Settlement without a swarm: receipts (forged, replayed, inflated), the hash-chained ledger, the plugin registry,
and the EVM escrow on the in-process py-evm chain."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
from chain_node import anvil_node, find_anvil, funded_accounts

from swarm.dht.identity import Identity
from swarm.settlement import Receipt, ReceiptBook, ReceiptError, SettlementWorker, issue, load_backend
from swarm.settlement.ledger import LedgerCorrupted, LedgerSettlement
from swarm.settlement.plugin import parse_options

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def keys() -> dict[str, Identity]:
    return {name: Identity.load_or_create(None) for name in ("server", "server2", "client", "mallory")}


def book_for(keys, session_id: str = "s1", **kwargs) -> ReceiptBook:
    return ReceiptBook(keys["server"].peer_id, keys["client"].peer_id, MODEL, 0, 3, session_id, **kwargs)


def receipt_for(keys, tokens: int, seq: int, session_id: str = "s1", server: str = "server", price: int = 2,
                payee: str = "") -> Receipt:
    return issue(keys[server], keys["client"].peer_id, MODEL, 0, 3, tokens, price, session_id, seq, payee)


# ---- receipts


def test_client_accepts_valid_receipts_and_countersigns(keys):
    book = book_for(keys)
    book.count(0, 6)  # prefill of 6 tokens
    assert book.offer(receipt_for(keys, 6, 1).to_wire()) is not None
    book.count(1, 1)
    book.count(1, 1)  # the same step pushed and relayed: counted once
    assert book.offer(receipt_for(keys, 7, 2).to_wire()) is not None
    wire = book.countersign(keys["client"], LedgerSettlement({"path": ":memory:"}))
    receipt = Receipt.from_wire(wire)
    receipt.check_signatures()
    assert (receipt.tokens, receipt.seq, receipt.amount) == (7, 2, 14)
    assert book.rejected == []


def test_client_refuses_inflated_replayed_and_misaddressed_receipts(keys):
    book = book_for(keys, max_price=5)
    book.count(0, 4)
    assert book.offer(receipt_for(keys, 5, 1).to_wire()) is None  # more tokens than were sent
    assert book.offer(receipt_for(keys, 4, 1).to_wire()) is not None
    assert book.offer(receipt_for(keys, 4, 1).to_wire()) is None  # same seq again
    assert book.offer(receipt_for(keys, 4, 2, session_id="other").to_wire()) is None
    assert book.offer(receipt_for(keys, 4, 2, server="server2").to_wire()) is None  # another server's
    assert book.offer(receipt_for(keys, 4, 2, price=6).to_wire()) is None  # above max_price
    assert book.offer({"server": "x"}) is None  # malformed
    assert len(book.rejected) == 6
    assert book.latest.seq == 1


def test_client_will_not_countersign_a_forged_server_signature(keys):
    book = book_for(keys)
    book.count(0, 10)
    genuine = receipt_for(keys, 3, 1)
    # the fields of server 1 signed by mallory's key, and mallory's key under server 1's name
    forged = replace(genuine, server_sig=keys["mallory"].sign(genuine.body()))
    book.offer(forged.to_wire())
    assert book.countersign(keys["client"], LedgerSettlement({"path": ":memory:"})) is None
    assert "signature" in book.rejected[-1]


def test_signatures_bind_every_field(keys):
    signed = receipt_for(keys, 5, 1).countersigned(keys["client"])
    signed.check_signatures()
    with pytest.raises(ReceiptError, match="server"):
        replace(signed, tokens=50).check_signatures()  # inflated after signing
    with pytest.raises(ReceiptError, match="client"):  # countersigned by someone else under the client's name
        replace(signed, client_key=keys["mallory"].public_key,
                client_sig=keys["mallory"].sign(b"countersign/" + signed.body())).check_signatures()
    with pytest.raises(ValueError):
        receipt_for(keys, 5, 1).countersigned(keys["mallory"])  # only the client named may countersign


# ---- plugin registry


def test_backends_are_found_by_entry_point_name(tmp_path):
    ledger = load_backend("ledger", {"path": str(tmp_path / "l.sqlite")})
    assert isinstance(ledger, LedgerSettlement)
    with pytest.raises(ValueError, match="unknown settlement backend 'nope'.*evm.*ledger"):
        load_backend("nope")
    assert parse_options(["path=/a=b", "x=1"]) == {"path": "/a=b", "x": "1"}
    with pytest.raises(ValueError):
        parse_options(["novalue"])


# ---- ledger


def test_ledger_balances_add_up_over_many_sessions(keys, tmp_path):
    ledger = LedgerSettlement({"path": str(tmp_path / "ledger.sqlite")})
    worker = SettlementWorker(ledger, keys["server"].peer_id, period=0.05)
    expected = {"server": 0, "server2": 0}
    for session in range(40):
        server = "server" if session % 3 else "server2"
        tokens, price = 0, 3 if server == "server" else 5
        for seq in range(1, session % 4 + 2):  # a few cumulative receipts per session, some settled mid-way
            tokens += 7 * seq
            worker.submit(receipt_for(keys, tokens, seq, f"s{session}", server, price).countersigned(keys["client"]))
        expected[server] += tokens * price
    worker.stop()  # settles what is queued and closes the ledger
    assert worker.stats["receipts_rejected"] == 0
    ledger = LedgerSettlement({"path": str(tmp_path / "ledger.sqlite")})  # reopened: the same chain
    assert ledger.balance(keys["server"].peer_id) == expected["server"]
    assert ledger.balance(keys["server2"].peer_id) == expected["server2"]
    assert ledger.spent(keys["client"].peer_id) == expected["server"] + expected["server2"]
    assert worker.stats["earnings"] == expected["server"]
    assert ledger.withdraw(keys["server"].peer_id) == expected["server"]
    assert ledger.balance(keys["server"].peer_id) == 0
    assert ledger.verify() > 40


def test_ledger_refuses_replays_and_unsigned_receipts(keys, tmp_path):
    ledger = LedgerSettlement({"path": str(tmp_path / "ledger.sqlite")})
    first = receipt_for(keys, 10, 1).countersigned(keys["client"])
    ledger.record_receipt(first)
    with pytest.raises(ReceiptError, match="replayed"):
        ledger.record_receipt(first)  # queued already
    ledger.settle()
    with pytest.raises(ReceiptError, match="replayed"):
        ledger.record_receipt(first)  # settled already
    with pytest.raises(ReceiptError, match="countersignature"):
        ledger.record_receipt(receipt_for(keys, 20, 2))  # the client never signed it
    ledger.record_receipt(receipt_for(keys, 25, 2).countersigned(keys["client"]))
    assert ledger.settle() == 15 * 2  # only the increase over the settled receipt
    assert ledger.balance(keys["server"].peer_id) == 25 * 2


@pytest.mark.parametrize("tamper", [
    "UPDATE entries SET amount = amount * 10 WHERE id = 2",
    "DELETE FROM entries WHERE id = 2",
    "UPDATE entries SET account = 'someone-else' WHERE id = 1",
    "DELETE FROM entries WHERE id = 3",  # the newest row: what is left is a valid chain, shorter than its head
])
def test_ledger_detects_tampering(keys, tmp_path, tamper):
    path = tmp_path / "ledger.sqlite"
    ledger = LedgerSettlement({"path": str(path)})
    for session in range(3):
        ledger.record_receipt(receipt_for(keys, 5, 1, f"s{session}").countersigned(keys["client"]))
        ledger.settle()
    assert ledger.verify() == 3
    with sqlite3.connect(path) as db:
        db.execute(tamper)
    with pytest.raises(LedgerCorrupted):
        ledger.verify()


def test_a_signed_ledger_head_shows_a_truncation_even_when_the_head_is_rewritten(keys, tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = LedgerSettlement({"path": str(path)})
    ledger.bind_identity(keys["server"])  # as a server running the ledger does
    for session in range(3):
        ledger.record_receipt(receipt_for(keys, 5, 1, f"s{session}").countersigned(keys["client"]))
        ledger.settle()
    assert ledger.verify(signer=keys["server"].peer_id) == 3
    with pytest.raises(LedgerCorrupted, match="signed by"):
        ledger.verify(signer=keys["client"].peer_id)
    with sqlite3.connect(path) as db:  # drop the newest entry and make the head match what is left
        db.execute("DELETE FROM entries WHERE id = 3")
        db.execute("UPDATE head SET count = 2, hash = (SELECT hash FROM entries WHERE id = 2)")
    with pytest.raises(LedgerCorrupted, match="head signature does not hold"):
        ledger.verify()
    with sqlite3.connect(path) as db:  # or strip the signature too
        db.execute("UPDATE head SET signer = NULL, signature = NULL")
    assert ledger.verify() == 2  # an unsigned head proves nothing about who wrote it
    with pytest.raises(LedgerCorrupted, match="not signed"):
        ledger.verify(signer=keys["server"].peer_id)


def test_ledger_detects_a_rehashed_row_with_a_forged_receipt(keys, tmp_path):
    """Whoever rewrites a row and recomputes the whole chain still cannot make the client's signature cover it."""
    ledger = LedgerSettlement({"path": str(tmp_path / "ledger.sqlite")})
    ledger.record_receipt(receipt_for(keys, 5, 1).countersigned(keys["client"]))
    ledger.settle()
    inflated = replace(receipt_for(keys, 5, 1).countersigned(keys["client"]), tokens=500)
    rewritten = LedgerSettlement({"path": str(tmp_path / "rewritten.sqlite")})
    with rewritten.lock, rewritten.db:  # a forger with the code: a well-formed chain around a bad receipt
        import msgpack

        rewritten._append([("credit", inflated.server, inflated.client, inflated.session_key(), 1, inflated.amount,
                            msgpack.packb(inflated.to_wire()))])
    with pytest.raises(LedgerCorrupted, match="receipt"):
        rewritten.verify()


# ---- EVM on the in-process chain


@pytest.fixture(scope="module")
def anvil_url():
    """A real anvil node for this module's tests (ended by PID at teardown)."""
    if find_anvil() is None:
        pytest.skip("anvil is not installed: `npm install --prefix .venv/node @foundry-rs/anvil@1.7.1` (.ci/run does)")
    with anvil_node() as url:
        yield url


@pytest.fixture(params=["py-evm", "anvil"])
def chain(request):
    """A deployed escrow on the in-process py-evm chain or on a real anvil node; funded fresh accounts."""
    from web3 import EthereumTesterProvider, Web3

    from swarm.settlement.evm import deploy_escrow, send

    if request.param == "anvil":
        w3 = Web3(Web3.HTTPProvider(request.getfixturevalue("anvil_url")))
    else:
        w3 = Web3(EthereumTesterProvider())
    accounts = funded_accounts(w3, ["deployer", "server", "client", "other"])
    contract = deploy_escrow(w3, accounts["deployer"].key)
    return {"w3": w3, "accounts": accounts, "contract": contract, "send": send}


def evm_backends(chain, server: str = "server", client: str = "client"):
    from swarm.settlement.evm import EVMSettlement

    accounts, w3 = chain["accounts"], chain["w3"]
    server_side = EVMSettlement({"contract": chain["contract"], "private_key": accounts[server].key.hex()}, w3=w3)
    client_side = EVMSettlement({"contract": chain["contract"], "private_key": accounts[client].key.hex()}, w3=w3)
    return server_side, client_side


def test_evm_deposit_settle_batch_withdraw(keys, chain):
    from swarm.settlement.evm import escrow_at

    w3, accounts = chain["w3"], chain["accounts"]
    escrow = escrow_at(w3, chain["contract"])
    chain["send"](w3, accounts["client"].key, escrow.functions.deposit(), value=10**18)
    server_side, client_side = evm_backends(chain)
    price = 10**12  # wei per token
    sessions = {f"s{i}": 0 for i in range(5)}
    for seq in (1, 2):
        for session_id in sessions:
            sessions[session_id] += 4 + seq
            receipt = receipt_for(keys, sessions[session_id], seq, session_id, price=price,
                                  payee=server_side.payee())
            server_side.record_receipt(receipt.countersigned(keys["client"], client_side.countersign_extra(receipt)))
        credited = server_side.settle()  # one transaction for all five sessions
        assert credited == len(sessions) * (4 + seq) * price
    total = sum(sessions.values()) * price
    assert server_side.balance() == total
    assert escrow.functions.deposits(accounts["client"].address).call() == 10**18 - total
    before = w3.eth.get_balance(accounts["server"].address)
    assert server_side.withdraw() == total
    assert server_side.balance() == 0
    assert w3.eth.get_balance(accounts["server"].address) > before + total - 10**16  # earnings minus gas


def test_evm_replayed_and_forged_claims_revert(keys, chain):
    from swarm.settlement.evm import REVERTS, escrow_at, sign_claim

    w3, accounts, send = chain["w3"], chain["accounts"], chain["send"]
    escrow = escrow_at(w3, chain["contract"])
    send(w3, accounts["client"].key, escrow.functions.deposit(), value=10**18)
    server = accounts["server"].address
    key = b"\x01" * 32

    def claim(signer: str, total: int, address: str | None = None) -> dict:
        signed = sign_claim(accounts[signer].key, chain["contract"], server, total, key)
        return {"client": address or signed["address"], "total": total, "key": key, "v": signed["v"],
                "r": signed["r"], "s": signed["s"]}

    good = claim("client", 1000)
    send(w3, accounts["server"].key, escrow.functions.settle(good))
    with pytest.raises(REVERTS, match="receipt used"):
        send(w3, accounts["server"].key, escrow.functions.settle(good))  # replay
    with pytest.raises(REVERTS, match="bad signature"):  # signed by another key, claimed for the client
        send(w3, accounts["server"].key, escrow.functions.settle(claim("other", 2000, accounts["client"].address)))
    with pytest.raises(REVERTS, match="bad signature"):  # a genuine claim, but the signature is for `server`
        send(w3, accounts["other"].key, escrow.functions.settle(claim("client", 3000)))
    with pytest.raises(REVERTS, match="receipt used"):  # a batch with a replay in it reverts as a whole
        send(w3, accounts["server"].key, escrow.functions.settle_batch([claim("client", 1500), good]))
    assert escrow.functions.earnings(server).call() == 1000
    # and the backend refuses such receipts before they cost gas
    server_side, client_side = evm_backends(chain)
    receipt = receipt_for(keys, 10, 1, price=100, payee=server)
    extra = client_side.countersign_extra(receipt)
    server_side.record_receipt(receipt.countersigned(keys["client"], extra))
    server_side.settle()
    with pytest.raises(ReceiptError, match="replayed"):
        server_side.record_receipt(receipt.countersigned(keys["client"], extra))
    inflated = receipt_for(keys, 99, 2, price=100, payee=server)
    with pytest.raises(ReceiptError, match="chain signature"):
        server_side.record_receipt(inflated.countersigned(keys["client"], extra))  # the old chain signature
