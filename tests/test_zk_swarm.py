"""Challenged forwards through real servers started with ``--zk``: an honest server's proofs verify against the
client's own circuit (made from its checkpoint); a server that perturbs its output is caught by its proof, one that
changed a weight by the commitment check (that a proof made with other weights fails under the reference verifying
key is tests/test_zk.py's); a truncated proof, a challenge no circuit fits, a server without ``--zk`` and an unknown
ticket get clear refusals, and the client keeps working.

Provers and the client share one circuit directory (and so one SRS, as they would share a public ceremony's): the
circuit of block 0's weights is made once (about 30 s here) and each proof takes about 20-30 s, so only block 0's
servers prove; block 1's server runs without ``--zk``."""

from __future__ import annotations

import time

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

pytest.importorskip("ezkl", reason="the zk extra (ezkl, onnx) is part of the dev install")
pytestmark = pytest.mark.slow(seconds=220)  # a proof takes ~20-30 s

from swarm import AutoDistributedModelForCausalLM, RoutingPolicy  # noqa: E402
from swarm.blocks.provable import ProvableSpan  # noqa: E402
from swarm.blocks.span import BlockSpan  # noqa: E402
from swarm.client.routing import MissingBlocksError  # noqa: E402
from swarm.rpc import protocol  # noqa: E402
from swarm.rpc.client import RemoteError, call  # noqa: E402

LENGTH = 3  # positions proven: the circuits' input is (1, LENGTH, 16)
PRICE = 3


def earnings_after_a_session(model, peer: str) -> int:
    """What ``peer`` earned from a generation of ``model``'s (4 positions) once settled (or not) after its close."""
    model.generate(prompt(9), max_new_tokens=2, do_sample=False)
    manager = model.get_remote().manager
    deadline = time.monotonic() + 10
    while True:
        earnings = manager.loop.run(call(manager.p2p, peer, protocol.INFO, {}, timeout=10))["settlement"]["earnings"]
        if earnings or time.monotonic() > deadline:
            return earnings
        time.sleep(0.2)


def test_the_provable_restatement_equals_the_served_span(tiny_model):
    for family in ("llama", "mistral", "qwen2"):
        span = BlockSpan.from_pretrained(tiny_model(family), 0, 3)
        hidden = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            served, provable = span(hidden, torch.arange(5)[None]), ProvableSpan(span, 5)(hidden)
        assert (served - provable).abs().max().item() < 1e-4, family
    with pytest.raises(ValueError, match="proofs are made for llama, mistral, qwen2 blocks; these are gpt2"):
        ProvableSpan(BlockSpan.from_pretrained(tiny_model("gpt2"), 0, 1), 5)
    with pytest.raises(ValueError, match="float32 blocks without quantization"):
        ProvableSpan(BlockSpan.from_pretrained(tiny_model("llama"), 0, 1, dtype=torch.bfloat16), 5)


@pytest.fixture(scope="module")
def swarm(launcher, tiny_model, tmp_path_factory):
    path = tiny_model("llama16")
    zk = str(tmp_path_factory.mktemp("zk"))
    args = ("--zk", zk, "--zk-max-positions", "4")

    def ledger(name: str) -> tuple[str, ...]:  # paid for sessions only once their client's challenges verified
        return "--settlement", "ledger", "--settlement-option", f"path={zk}/{name}.sqlite", "--price", str(PRICE)

    honest = launcher.start_server_in_process(path, "0:1", [], *args, *ledger("honest"))
    peers = [honest.maddr]
    second = launcher.start_server(path, "1:2", peers, wait=False)  # without --zk
    faulty = {fault: launcher.start_server(path, "0:1", peers, *args, *(ledger(fault) if fault[0] == "p" else ()),
                                           env={"SWARM_TEST_FAULT": fault}, wait=False)
              for fault in ("perturb:0.3", "edit-weight", "truncate-proof")}
    servers = {"honest": honest, "second": second.wait_ready(),
               **{fault: process.wait_ready() for fault, process in faulty.items()}}
    return {"path": path, "peers": peers, "zk": zk, **servers}


def client(swarm, first: str, **options):
    allowed = [swarm[first].peer_id, swarm["second"].peer_id]
    options = {"compression": "none", "verify_probability": 0.0, "arbitration_blocks": 0, "zk_probability": 1.0,
               "zk_directory": swarm["zk"], "routing_policy": RoutingPolicy(allowed_servers=allowed), **options}
    return AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"], **options)


def prompt(seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def results_of(model) -> dict[str, tuple[bool, str]]:
    manager = model.get_remote().manager
    return {r.peer: (r.verified, r.reason) for r in manager.loop.run(manager.proofs.wait())}


def refusals_of(model) -> list[tuple[str, str]]:
    return model.get_remote().manager.proofs.refused


def test_an_honest_servers_challenged_forwards_verify(swarm):
    local = AutoModelForCausalLM.from_pretrained(swarm["path"]).eval()
    model = client(swarm, "honest", settlement="ledger")
    ids = prompt(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)  # challenged or not, the output is the model's
    assert results_of(model) == {swarm["honest"].peer_id: (True, "")}
    assert refusals_of(model) == [(swarm["second"].peer_id, "this server makes no proofs (it runs without --zk)")]
    proofs = model.get_remote().manager.proofs
    assert not proofs.unsettled(swarm["honest"].peer_id)  # its receipts may be countersigned again
    assert all(r.seconds > 0 for r in proofs.results)
    assert earnings_after_a_session(model, swarm["honest"].peer_id) == 4 * PRICE


def test_a_server_that_perturbs_its_output_is_caught_by_its_proof(swarm):
    model = client(swarm, "perturb:0.3", settlement="ledger")
    with torch.no_grad():
        model(prompt(1))
    verified, reason = results_of(model)[swarm["perturb:0.3"].peer_id]
    assert not verified and "differs from the proven output" in reason
    manager = model.get_remote().manager
    assert manager.stats_for(swarm["perturb:0.3"].peer_id).strikes >= 1
    assert manager.proofs.unsettled(swarm["perturb:0.3"].peer_id)
    assert earnings_after_a_session(model, swarm["perturb:0.3"].peer_id) == 0  # its receipts are never countersigned


def test_a_server_with_an_edited_weight_fails_the_commitment_check(swarm):
    trusting = client(swarm, "edit-weight", zk_probability=0.0)
    assert trusting.route()[0].peer_id == swarm["edit-weight"].peer_id
    careful = client(swarm, "edit-weight", require_weights="reference", zk_probability=0.0)
    # the only server of block 0 it may use: excluded
    with pytest.raises(MissingBlocksError, match="weights commitment .* differs from the reference"):
        careful.route()


def test_bad_proofs_and_challenges_are_refused_and_the_client_keeps_working(swarm):
    local = AutoModelForCausalLM.from_pretrained(swarm["path"]).eval()
    model = client(swarm, "truncate-proof")
    with torch.no_grad():
        assert torch.equal(model(prompt(3)).logits, local(prompt(3)).logits)
    verified, reason = results_of(model)[swarm["truncate-proof"].peer_id]
    assert not verified and "malformed proof" in reason
    # challenges no circuit fits are refused, the forwards themselves served
    proofs = model.get_remote().manager.proofs
    for ids in (prompt(4, length=5), prompt(5).repeat(2, 1)):
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, local(ids).logits, atol=1e-5)
    reasons = [reason for peer, reason in proofs.refused if peer == swarm["truncate-proof"].peer_id]
    assert any("at most 4 positions" in r for r in reasons) and any("one sequence" in r for r in reasons)
    manager = model.get_remote().manager
    with pytest.raises(RemoteError, match="no such proof ticket"):
        manager.loop.run(call(manager.p2p, swarm["honest"].peer_id, protocol.PROOF, {"ticket": "0" * 32}))
