"""Settlement in a real swarm: after a generation, each server's earnings are the tokens it served times its price,
on the ledger backend and on the EVM backend (anvil); U-Net levels are paid for the samples they evaluate; with
settlement off, serving is unchanged."""

from __future__ import annotations

import time

import pytest
import torch
from chain_node import anvil_node, find_anvil, funded_accounts
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, AutoDistributedPipeline
from swarm.hub.tiny_diffusion import save_tiny_sd
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, call
from swarm.settlement.ledger import LedgerSettlement

PRICE = 3
EVM_PRICE = 10**9  # wei per token
PROMPT, NEW_TOKENS = 6, 5
EXACT = {"compression": "none", "edge_compression": "none", "verify_probability": 0.0}


@pytest.fixture(scope="module")
def anvil_chain():
    """A real anvil node with a deployed escrow and a client deposit; None without anvil (its test then skips)."""
    if find_anvil() is None:
        yield None
        return
    from web3 import Web3

    from swarm.settlement.evm import deploy_escrow, escrow_at, send

    with anvil_node() as url:
        w3 = Web3(Web3.HTTPProvider(url))
        accounts = funded_accounts(w3, ["deployer", "server", "client"])
        contract = deploy_escrow(w3, accounts["deployer"].key)
        send(w3, accounts["client"].key, escrow_at(w3, contract).functions.deposit(), value=10**18)
        yield {"url": url, "w3": w3, "accounts": accounts, "contract": contract}


@pytest.fixture(scope="module")
def ledger_swarm(launcher, tiny_model, tmp_path_factory, anvil_chain):
    """Blocks 0:3 and 3:6 on two servers settling on their own ledgers; on the side, a server of all blocks without
    settlement and (with anvil) one settling on the chain, each a swarm of its own. All start at once."""
    path, folder = tiny_model("llama"), tmp_path_factory.mktemp("ledgers")

    def server(blocks: str, peers: list[str], *extra: str):
        return launcher.start_server_in_process(path, blocks, peers, "--throughput", "1", *extra, wait=False)

    def ledger(name: str) -> list[str]:
        return ["--settlement", "ledger", "--settlement-option", f"path={folder / name}.sqlite", "--price", str(PRICE)]

    first, plain = server("0:3", [], *ledger("first")), server("0:6", [])
    paid = server("0:6", [], *ledger("paid"), "--require-payment")  # a swarm of its own
    chain = None
    if anvil_chain is not None:
        options = (f"rpc_url={anvil_chain['url']}", f"contract={anvil_chain['contract']}",
                   f"private_key={anvil_chain['accounts']['server'].key.hex()}")
        chain = server("0:6", [], "--settlement", "evm", "--price", str(EVM_PRICE),
                       *[arg for option in options for arg in ("--settlement-option", option)])
    second = server("3:6", [first.wait_ready().maddr], *ledger("second"))
    for process in (second, plain, chain, paid):
        if process is not None:
            process.wait_ready()
    yield {"path": path, "peers": [first.maddr], "servers": [first, second], "plain": plain, "chain": chain,
           "paid": paid,
           "ledgers": [folder / "first.sqlite", folder / "second.sqlite"],
           "local": AutoModelForCausalLM.from_pretrained(path).eval()}
    if chain is not None:
        chain.stop()  # before anvil goes away


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def settlement_info(model, peer_id: str) -> dict | None:
    """The server's settlement info, asked through ``model``'s client (a causal LM or a remote U-Net)."""
    manager = model.manager if hasattr(model, "manager") else model.get_remote().manager
    return manager.loop.run(call(manager.p2p, peer_id, protocol.INFO, {}, timeout=10))["settlement"]


def wait_for_earnings(model, peer_id: str, expected: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = settlement_info(model, peer_id)
        if info["earnings"] == expected or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def generate(model, seed: int = 0) -> torch.Tensor:
    return model.generate(prompt(seed), max_new_tokens=NEW_TOKENS, do_sample=False)


def test_ledger_earnings_equal_tokens_served_times_price(ledger_swarm):
    # receipts countersigned every 2 steps and at close: cumulative, so they are paid once
    model = AutoDistributedModelForCausalLM.from_pretrained(
        ledger_swarm["path"], initial_peers=ledger_swarm["peers"], settlement="ledger", receipt_interval=2, **EXACT)
    try:
        assert [(s.start, s.end) for s in model.route()] == [(0, 3), (3, 6)]
        generate(model)
        # the prompt, then one new position per decode step (the last token is never fed back)
        tokens = PROMPT + NEW_TOKENS - 1
        for server in ledger_swarm["servers"]:
            info = wait_for_earnings(model, server.peer_id, tokens * PRICE)
            assert info["earnings"] == tokens * PRICE, server.output()[-3000:]
            assert info["receipts_rejected"] == 0 and info["account"] == server.peer_id
        # the first server got mid-session receipts with the client's steps; the second, fed by pushes, one at close
        assert settlement_info(model, ledger_swarm["servers"][0].peer_id)["receipts_settled"] >= 2
        generate(model, seed=1)  # a second session adds up
        for server, path in zip(ledger_swarm["servers"], ledger_swarm["ledgers"], strict=True):
            assert wait_for_earnings(model, server.peer_id, 2 * tokens * PRICE)["earnings"] == 2 * tokens * PRICE
            ledger = LedgerSettlement({"path": str(path)})  # the server's own file, read here
            assert ledger.verify() >= 2
            assert ledger.balance(server.peer_id) == 2 * tokens * PRICE
            assert ledger.spent(model.get_remote().manager.identity.peer_id) == 2 * tokens * PRICE
            ledger.close()
    finally:
        model.shutdown()


def test_without_settlement_serving_is_unchanged(ledger_swarm):
    local = ledger_swarm["local"].generate(prompt(2), max_new_tokens=NEW_TOKENS, do_sample=False)
    # a client without settlement, on servers with it: same output, and nothing is credited for unsigned work
    model = AutoDistributedModelForCausalLM.from_pretrained(ledger_swarm["path"], initial_peers=ledger_swarm["peers"],
                                                             **EXACT)
    try:
        before = [settlement_info(model, s.peer_id)["earnings"] for s in ledger_swarm["servers"]]
        assert torch.equal(generate(model, seed=2), local)
        time.sleep(1.5)  # longer than a settlement batch
        assert [settlement_info(model, s.peer_id)["earnings"] for s in ledger_swarm["servers"]] == before
    finally:
        model.shutdown()
    # a server without settlement, with a client that has it on: same output, no receipts anywhere
    plain = ledger_swarm["plain"]
    model = AutoDistributedModelForCausalLM.from_pretrained(ledger_swarm["path"], initial_peers=[plain.maddr],
                                                             settlement="ledger", **EXACT)
    try:
        with model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
            assert torch.equal(generate(model, seed=2), local)
            assert session.hops[0].receipts.latest is None and session.hops[0].receipts.sent > 0
        assert settlement_info(model, plain.peer_id) is None
    finally:
        model.shutdown()


def test_unet_levels_earn_the_samples_they_evaluate_times_price(launcher, models_dir, tmp_path):
    """A U-Net generation settles like a text one: each down or up pass a server runs counts its samples."""
    path = models_dir / "tiny-sd-pipeline"
    if not path.exists():
        save_tiny_sd(path)

    def ledger(name: str) -> list[str]:
        return ["--settlement", "ledger", "--settlement-option", f"path={tmp_path / name}.sqlite", "--price",
                str(PRICE)]

    first = launcher.start_server_in_process(path, "0:1", [], *ledger("first"))
    last = launcher.start_server_in_process(path, "1:3", [first.maddr], *ledger("last"))  # with the mid block
    pipe = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], settlement="ledger",
                                                   receipt_interval=2, compression="none")
    unet, evaluations = pipe.unet, 3
    try:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 4, 8, 8, generator=generator)  # batch 2, as with classifier-free guidance
        ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
        with torch.no_grad():
            for step in range(evaluations):
                unet(sample, torch.tensor(900 - 300 * step), ehs)
        books = [hop.receipts for hop in unet.session.hops]
        assert [(hop.span.start, hop.span.end) for hop in unet.session.hops] == [(0, 1), (1, 3)]
        unet.close_session()  # the close carries each server's final receipt
        # the first server runs a down and an up pass per evaluation; the last runs its down, mid and up in one
        expected = [evaluations * 2 * 2, evaluations * 2]
        assert [book.sent for book in books] == expected and not any(book.rejected for book in books)
        for server, samples in zip((first, last), expected, strict=True):
            info = wait_for_earnings(unet, server.peer_id, samples * PRICE)
            assert info["earnings"] == samples * PRICE and info["receipts_rejected"] == 0, info
    finally:
        unet.shutdown()


def test_clients_pay_no_more_than_advertised_and_servers_may_require_payment(ledger_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        ledger_swarm["path"], initial_peers=ledger_swarm["peers"], settlement="ledger", **EXACT)
    try:
        with model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
            generate(model)
            # the price each server advertised when it was chosen is the most its receipts may ask
            assert [hop.receipts.max_price for hop in session.hops] == [PRICE, PRICE]
            assert all(hop.span.info.price == PRICE for hop in session.hops)
    finally:
        model.shutdown()
    paid = ledger_swarm["paid"]
    greedy = dict(max_new_tokens=4, do_sample=False)
    # a client that does not settle is refused by a server that requires payment, with the server's reason
    model = AutoDistributedModelForCausalLM.from_pretrained(ledger_swarm["path"], initial_peers=[paid.maddr],
                                                             **EXACT)
    try:
        with pytest.raises(RemoteError, match="payment required: this server serves only clients that settle"):
            generate(model)
        with pytest.raises(RemoteError, match="payment required: .*does not serve forward"):
            model(prompt())
    finally:
        model.shutdown()
    # one that settles is served; one that stops countersigning is cut off after the grace of 64 steps
    model = AutoDistributedModelForCausalLM.from_pretrained(ledger_swarm["path"], initial_peers=[paid.maddr],
                                                             settlement="ledger", **EXACT)
    stingy = AutoDistributedModelForCausalLM.from_pretrained(ledger_swarm["path"], initial_peers=[paid.maddr],
                                                              settlement="ledger", receipt_interval=10**6,
                                                              max_retries=0, **EXACT)
    try:
        assert torch.equal(model.generate(prompt(3), **greedy), ledger_swarm["local"].generate(prompt(3), **greedy))
        with pytest.raises(RemoteError, match="payment required: no countersigned receipt for 64 steps"):
            stingy.generate(prompt(4), max_new_tokens=80, do_sample=False, eos_token_id=None)
    finally:
        model.shutdown()
        stingy.shutdown()


def test_countersigned_receipts_survive_a_sigkill_of_the_server(launcher, tiny_model, tmp_path):
    """Receipts are journaled before the step that carried them is answered: a server killed before settling
    settles them when it starts again (same identity, same ledger)."""
    import signal

    path, ledger_path, key = tiny_model("llama"), tmp_path / "killed.sqlite", tmp_path / "server.key"
    args = ["--throughput", "1", "--identity", str(key), "--settlement", "ledger", "--settlement-option",
            f"path={ledger_path}", "--price", str(PRICE), "--settlement-period", "600"]  # never settles by itself
    server = launcher.start_server(path, "0:6", [], *args)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[server.maddr], settlement="ledger",
                                                             receipt_interval=1, **EXACT)
    try:
        with model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
            generate(model)
            countersigned = session.hops[0].receipts.latest  # the last one sent back, with the last step
        assert settlement_info(model, server.peer_id)["earnings"] == 0  # nothing settled yet
    finally:
        model.shutdown()
    server.signal(signal.SIGKILL)
    server.proc.wait(30)
    again = launcher.start_server(path, "0:6", [], *args)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[again.maddr], **EXACT)
    try:
        info = settlement_info(model, again.peer_id)
        # at least every receipt countersigned with a step (the one sent at close may have been in flight)
        assert info["earnings"] >= countersigned.tokens * PRICE - PRICE * NEW_TOKENS and info["earnings"] > 0, info
        assert info["earnings"] <= (PROMPT + NEW_TOKENS - 1) * PRICE
    finally:
        model.shutdown()
    ledger = LedgerSettlement({"path": str(ledger_path)})
    assert ledger.verify() >= 1 and ledger.balance(again.peer_id) == info["earnings"]
    ledger.close()


def test_evm_earnings_on_anvil_equal_tokens_served_times_price(ledger_swarm, anvil_chain):
    if anvil_chain is None:
        pytest.skip("anvil is not installed: `npm install --prefix .venv/node @foundry-rs/anvil@1.7.1` (.ci/run does)")
    from swarm.settlement.evm import EVMSettlement, escrow_at

    w3, accounts, contract = anvil_chain["w3"], anvil_chain["accounts"], anvil_chain["contract"]
    escrow, server = escrow_at(w3, contract), ledger_swarm["chain"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        ledger_swarm["path"], initial_peers=[server.maddr], settlement="evm",
        settlement_options={"contract": contract, "private_key": accounts["client"].key.hex()}, **EXACT)
    try:
        generate(model)
        expected = (PROMPT + NEW_TOKENS - 1) * EVM_PRICE
        info = wait_for_earnings(model, server.peer_id, expected)
        assert info["earnings"] == expected, server.output()[-3000:]
        assert info["payee"] == accounts["server"].address
        assert escrow.functions.earnings(accounts["server"].address).call() == expected
        assert escrow.functions.deposits(accounts["client"].address).call() == 10**18 - expected
    finally:
        model.shutdown()
    # the server's account withdraws its earnings
    backend = EVMSettlement({"rpc_url": anvil_chain["url"], "contract": contract,
                             "private_key": accounts["server"].key.hex()})
    before = w3.eth.get_balance(accounts["server"].address)
    assert backend.withdraw() == expected
    assert escrow.functions.earnings(accounts["server"].address).call() == 0
    assert w3.eth.get_balance(accounts["server"].address) > before + expected - 10**15  # earnings in, minus gas


def test_a_server_that_could_not_be_paid_refuses_to_start(launcher, tiny_model, anvil_chain):
    """A server whose key cannot pay a settlement's gas would serve and never be paid: it says so and exits at
    start. A wrong contract address is caught the same way."""
    if anvil_chain is None:
        pytest.skip("anvil is not installed: `npm install --prefix .venv/node @foundry-rs/anvil@1.7.1` (.ci/run does)")
    from eth_account import Account

    from swarm.settlement.evm import EVMSettlement
    from swarm.utils.errors import UserError

    broke = Account.create()
    options = (f"rpc_url={anvil_chain['url']}", f"contract={anvil_chain['contract']}", f"private_key={broke.key.hex()}")
    process = launcher.start_server(tiny_model("llama"), "0:6", [], "--throughput", "1", "--settlement", "evm",
                                    *[arg for option in options for arg in ("--settlement-option", option)],
                                    wait=False)
    assert process.proc.wait(120) != 0
    assert f"account {broke.address} holds 0 wei" in process.output() and "fund it first" in process.output()

    funded = anvil_chain["accounts"]["server"].key.hex()
    wrong = EVMSettlement({"rpc_url": anvil_chain["url"], "contract": broke.address, "private_key": funded})
    with pytest.raises(UserError, match=f"no contract at {broke.address}"):
        wrong.check_can_settle()
    right = EVMSettlement({"rpc_url": anvil_chain["url"], "contract": anvil_chain["contract"], "private_key": funded})
    assert anvil_chain["contract"] in right.check_can_settle()
