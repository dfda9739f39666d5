"""Inference sessions: decoding strategies, multi-turn chat, rewinds, concurrency and cache accounting."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from swarm import AutoDistributedModelForCausalLM
from swarm.rpc import protocol
from swarm.rpc.client import call


@pytest.fixture(scope="module")
def swarm(launcher, tiny_model):
    """A bootstrap node (python -m swarm.dht) and two servers joining through it."""
    path = tiny_model("llama")
    bootstrap = launcher.start_dht()
    servers = [launcher.start_server(path, blocks, [bootstrap.maddr], wait=False) for blocks in ("0:3", "3:6")]
    for server in servers:
        server.wait_ready()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[bootstrap.maddr],
                                                             compression="none")
    yield {"path": path, "peers": [bootstrap.maddr], "servers": servers, "model": model,
           "local": AutoModelForCausalLM.from_pretrained(path).eval()}
    model.shutdown()


def prompt(length: int = 6, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_bootstrap_node_prints_a_joinable_address(swarm):
    assert swarm["peers"][0].startswith("/ip4/127.0.0.1/tcp/")
    assert [(s.start, s.end) for s in swarm["model"].route()] == [(0, 3), (3, 6)]


def test_beam_search_equals_local(swarm):
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    out = swarm["model"].generate(prompt(seed=1), **kwargs)
    assert torch.equal(out, swarm["local"].generate(prompt(seed=1), **kwargs))


def test_sampling_with_repetition_penalty_equals_local(swarm):
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.3,
                  eos_token_id=None)
    torch.manual_seed(123)
    out = swarm["model"].generate(prompt(seed=2, batch=2), **kwargs)
    torch.manual_seed(123)
    assert torch.equal(out, swarm["local"].generate(prompt(seed=2, batch=2), **kwargs))


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_and_eos_equal_local(swarm):
    ids = prompt(seed=3)
    criteria = StoppingCriteriaList([StopAfter(ids.shape[1] + 7)])
    out = swarm["model"].generate(ids, max_new_tokens=30, stopping_criteria=criteria, do_sample=False)
    ref = swarm["local"].generate(ids, max_new_tokens=30, stopping_criteria=criteria, do_sample=False)
    assert torch.equal(out, ref) and out.shape[1] <= ids.shape[1] + 7
    greedy = swarm["local"].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(greedy[0, ids.shape[1] + 3])  # make the 4th greedy token the end of sequence
    out = swarm["model"].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, swarm["local"].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos))
    assert out.shape[1] == ids.shape[1] + 4


def test_multi_turn_session_keeps_server_caches(swarm):
    model, local = swarm["model"], swarm["local"]
    greedy = dict(do_sample=False, eos_token_id=None)
    with model.inference_session(max_length=64) as session:
        first = model.generate(prompt(seed=4), max_new_tokens=6, **greedy)
        assert session.position == first.shape[1] - 1  # the last sampled token is not fed yet
        second_turn = torch.cat([first, prompt(4, seed=5)], dim=1)
        second = model.generate(second_turn, max_new_tokens=6, **greedy)
        assert session.position == second.shape[1] - 1
        chain = session.chain
        # Regenerate the second answer from an edited turn: the session rewinds to the common prefix.
        edited = torch.cat([first, prompt(4, seed=6)], dim=1)
        regenerated = model.generate(edited, max_new_tokens=6, **greedy)
        assert session.chain == chain  # same servers, same caches
    assert torch.equal(second, local.generate(second_turn, max_new_tokens=6, **greedy))
    assert torch.equal(regenerated, local.generate(edited, max_new_tokens=6, **greedy))


def test_session_max_length_is_enforced_with_a_clear_error(swarm):
    model = swarm["model"]
    with model.inference_session(max_length=10):
        with pytest.raises(ValueError, match="max_length 10 exceeded"):
            model.generate(prompt(8), max_new_tokens=8, do_sample=False, eos_token_id=None)


def test_two_clients_at_once(swarm):
    results, errors = {}, []

    def run(seed: int) -> None:
        try:
            client = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                                      compression="none")
            try:
                results[seed] = client.generate(prompt(seed=seed, batch=2), max_new_tokens=20, do_sample=False,
                                                eos_token_id=None)
            finally:
                client.shutdown()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for seed in (10, 11):
        ref = swarm["local"].generate(prompt(seed=seed, batch=2), max_new_tokens=20, do_sample=False,
                                      eos_token_id=None)
        assert torch.equal(results[seed], ref)


def test_cache_is_freed_after_generate(swarm):
    model = swarm["model"]
    manager = model.get_remote().manager

    def free_tokens() -> list[int]:
        return [manager.loop.run(call(manager.p2p, s.peer_id, protocol.INFO, {}, timeout=10))["cache_tokens_left"]
                for s in swarm["servers"]]

    before = free_tokens()
    with model.inference_session(max_length=50):
        model.generate(prompt(), max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert free_tokens() == [n - 50 for n in before]
    deadline = time.monotonic() + 10
    while free_tokens() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_tokens() == before
