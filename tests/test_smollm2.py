"""The embedded SmolLM2-135M-Instruct (real weights): servers started without a MODEL argument serve it, and
greedy generation through 2 and 3 servers equals the local model token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, RoutingPolicy, load_tokenizer, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(launcher, embedded_model):
    # One announced speed for all (not measured while the four start at once and load the machine unevenly), so
    # that the number of hops alone decides the route.
    first = launcher.start_server_in_process(None, "0:10", [], "--throughput", "10")  # no MODEL: the embedded one
    others = [launcher.start_server_in_process(None, blocks, [first.maddr], "--throughput", "10", wait=False)
              for blocks in ("10:30", "10:20", "20:30")]
    for process in others:
        process.wait_ready()
    two_hops = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[first.maddr],
                                                                 compression="none")
    three_hops = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[first.maddr],
                                                                 routing_policy=RoutingPolicy(
                                                                     blocked_servers=[others[0].peer_id]),
                                                                 compression="none")
    local = AutoModelForCausalLM.from_pretrained(resolve_model(EMBEDDED_MODEL).config_path).eval()
    yield {"two_hops": two_hops, "three_hops": three_hops, "local": local, "tokenizer": load_tokenizer()}
    two_hops.shutdown()
    three_hops.shutdown()


def test_embedded_model_is_announced_under_its_hub_name(smollm2):
    assert smollm2["two_hops"].get_remote().model_id == EMBEDDED_MODEL
    assert [(s.start, s.end) for s in smollm2["two_hops"].route()] == [(0, 10), (10, 30)]
    assert [(s.start, s.end) for s in smollm2["three_hops"].route()] == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize("hops", ["two_hops", "three_hops"])
def test_greedy_answer_equals_local(smollm2, hops):
    tokenizer = smollm2["tokenizer"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    kwargs = dict(max_new_tokens=32, do_sample=False)
    out = smollm2[hops].generate(ids, **kwargs)
    assert torch.equal(out, smollm2["local"].generate(ids, **kwargs))
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_batch_with_left_padding_equals_local(smollm2):
    tokenizer = smollm2["tokenizer"]
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox jumps over the lazy", "Hello"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = smollm2["two_hops"].generate(**batch, **kwargs)
    ref = smollm2["local"].generate(**batch, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) < 1e-3
    assert "dog" in tokenizer.decode(out.sequences[0, batch["input_ids"].shape[1]:])
