"""Weights commitments: what a server announces equals what anyone computes from the checkpoint; a server that
changed one weight announces another commitment, and a client requiring the reference weights routes around it."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, RoutingPolicy
from swarm.blocks.span import BlockSpan
from swarm.blocks.weights import checkpoint_block_hashes, reference_weights, span_weights_commitment
from swarm.dht.schema import ModelInfo, ServerInfo, ServerState
from swarm.health.page import render_page
from swarm.health.state import SwarmState, model_status
from swarm.trust.weights import ReferenceWeights, block_hash, span_commitment
from swarm.utils import preloaded


def test_block_hash_covers_every_byte_name_dtype_and_shape():
    state = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(3)}
    reference = block_hash(state)
    assert block_hash(dict(reversed(list(state.items())))) == reference  # order of the dict does not matter
    edited = {**state, "a.weight": state["a.weight"].clone()}
    edited["a.weight"][1, 2] += 1e-6
    assert block_hash(edited) != reference
    assert block_hash({**state, "a.weight": state["a.weight"].reshape(3, 2)}) != reference
    assert block_hash({**state, "a.weight": state["a.weight"].to(torch.bfloat16)}) != reference
    assert block_hash({"a.weights": state["a.weight"], "b.bias": state["b.bias"]}) != reference
    hashes = [block_hash(state), block_hash(edited)]
    assert span_commitment(0, hashes) != span_commitment(1, hashes)  # the position of the span counts too
    assert span_commitment(0, hashes) != span_commitment(0, hashes[::-1])


@pytest.mark.parametrize("dtype, quantization", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")])
def test_a_served_span_commits_to_what_the_checkpoint_gives(tiny_model, dtype, quantization):
    path = tiny_model("llama")
    hashes = checkpoint_block_hashes(path, dtype, quantization)
    span = BlockSpan.from_pretrained(path, 2, 5, dtype=getattr(torch, dtype), quantization=quantization)
    assert span_weights_commitment(span) == span_commitment(2, hashes[2:5])
    reference = ReferenceWeights(block_hashes=lambda d, q: checkpoint_block_hashes(path, d, q))
    assert reference.mismatch(2, 5, dtype, quantization, span_weights_commitment(span)) is None
    weight = next(span.layers[1].parameters())  # int8: the quantized matrix itself
    with torch.no_grad():
        weight.view(-1)[0] += 0.01 if weight.is_floating_point() else 1
    assert "differs from the reference" in reference.mismatch(2, 5, dtype, quantization,
                                                              span_weights_commitment(span))


def test_without_a_reference_the_page_flags_the_odd_one_out():
    records = {f"p{i}": ServerInfo(ServerState.ONLINE, 0, 2, weights=value)
               for i, value in enumerate(["aa" * 32, "aa" * 32, "bb" * 32])}
    records["q"] = ServerInfo(ServerState.ONLINE, 0, 2, dtype="bfloat16", weights="cc" * 32)  # another kind
    status = model_status("m", ModelInfo(2), records, {})
    assert [(s.peer_id, s.weights_check) for s in status.servers] == [
        ("p0", None), ("p1", None), ("p2", "odd one out"), ("q", None)]
    assert "weights differ from its span's other servers" in status.servers[2].warnings
    with pytest.raises(ValueError, match="not a published weights document"):
        ReferenceWeights.from_published([{"span": "0:2", "dtype": "float32", "quantization": "none",
                                          "blocks": ["aa" * 32]}])


def test_the_record_field_and_bad_references():
    info = ServerInfo(ServerState.ONLINE, 0, 2, weights="ab" * 32)
    assert ServerInfo.from_dict(info.to_dict()).weights == "ab" * 32
    for bad in ("AB" * 32, "ab" * 31, 5, "zz" * 32):
        assert ServerInfo.from_dict({**info.to_dict(), "weights": bad}).weights == ""  # ignored, record kept
    trusted = reference_weights({"0:2": "cd" * 32})
    assert trusted.mismatch(0, 2, "float32", "none", "cd" * 32) is None
    assert trusted.mismatch(0, 2, "float32", "none", "") == "announces no weights commitment"
    assert "no reference weights for blocks 2:4" in trusted.mismatch(2, 4, "float32", "none", "cd" * 32)
    with pytest.raises(ValueError, match="sha256"):
        reference_weights({"0:2": "not a hash"})


@pytest.fixture(scope="module")
def swarm(launcher, tiny_model):
    """Blocks 0:6 on an honest server and on one serving a weight changed by 0.01, announcing itself fastest."""
    path = tiny_model("llama")
    honest = launcher.start_server_in_process(path, "0:6", [])
    edited = launcher.start_server(path, "0:6", [honest.maddr], "--throughput", "100000",
                                   env={"SWARM_TEST_FAULT": "edit-weight"})
    yield {"path": path, "peers": [honest.maddr], "honest": honest, "edited": edited}


def test_a_client_requiring_the_reference_weights_routes_around_an_edited_server(swarm):
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    local = AutoModelForCausalLM.from_pretrained(swarm["path"]).eval().generate(prompt, **greedy)
    policy = RoutingPolicy(latency_weight=0)
    trusting = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                                routing_policy=policy, compression="none")
    careful = AutoDistributedModelForCausalLM.from_pretrained(
        swarm["path"], initial_peers=swarm["peers"], routing_policy=RoutingPolicy(latency_weight=0),
        compression="none", require_weights="reference", verify_probability=0.0)
    try:
        assert trusting.route()[0].peer_id == swarm["edited"].peer_id  # fastest, and nothing asks for its weights
        assert careful.route()[0].peer_id == swarm["honest"].peer_id
        assert torch.equal(careful.generate(prompt, **greedy), local)
        servers = careful.get_remote().manager.servers
        honest, edited = servers[swarm["honest"].peer_id], servers[swarm["edited"].peer_id]
        # what `python -m swarm.verify commit` prints from the checkpoint is what the honest server signed
        printed = preloaded.run(["-m", "swarm.verify", "commit", str(swarm["path"]), "--blocks", "0:6"],
                                timeout=120, check=True).stdout.strip()
        assert honest.weights == printed and edited.weights not in ("", printed)
        # the health page: each server's commitment, checked against the published weights
        published = json.loads(preloaded.run(["-m", "swarm.verify", "commit", str(swarm["path"]), "--json"],
                                             timeout=120, check=True).stdout)
        status = model_status("m", ModelInfo(6), servers, {}, reference=ReferenceWeights.from_published([published]))
        checks = {server.peer_id: (server.weights_check, server.warnings) for server in status.servers}
        assert checks[swarm["honest"].peer_id][0] == "published"
        assert checks[swarm["edited"].peer_id][0] == "differs"
        assert "weights differ from the published ones" in checks[swarm["edited"].peer_id][1]
        assert f"title='{edited.weights}'" in render_page(SwarmState(updated_at=1.0, models=[status]), {}, 30)
        # the same client with the CLI's output as a trusted list
        trusted = AutoDistributedModelForCausalLM.from_pretrained(
            swarm["path"], initial_peers=swarm["peers"], routing_policy=RoutingPolicy(latency_weight=0),
            require_weights={"0:6": printed})
        try:
            assert trusted.route()[0].peer_id == swarm["honest"].peer_id
        finally:
            trusted.shutdown()
    finally:
        trusting.shutdown()
        careful.shutdown()
