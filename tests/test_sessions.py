"""Inference sessions: decoding strategies, multi-turn chat, rewinds, concurrency and cache accounting."""

from __future__ import annotations

import queue
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
    servers = [launcher.start_server_in_process(path, blocks, [bootstrap.maddr], wait=False)
               for blocks in ("0:3", "3:6")]
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
        with pytest.raises(ValueError, match=r"Maximum length exceeded .*session max_length 10, "):
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


def _pushes(swarm) -> list[dict]:
    manager = swarm["model"].get_remote().manager
    return [manager.loop.run(call(manager.p2p, s.peer_id, protocol.INFO, {}, timeout=10))["pushes"]
            for s in swarm["servers"]]


def test_servers_push_steps_to_each_other(swarm):
    before = _pushes(swarm)
    ids = prompt(seed=20)
    out = swarm["model"].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    after = _pushes(swarm)
    assert after[0]["sent"] - before[0]["sent"] == 10  # prefill + 9 decode steps went 0:3 -> 3:6 directly
    assert after[1]["received"] - before[1]["received"] == 10
    assert after[0]["failed"] == before[0]["failed"]

    relay_only = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                                 compression="none", push=False)
    try:
        assert torch.equal(relay_only.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None), out)
    finally:
        relay_only.shutdown()
    assert _pushes(swarm) == after  # no push without the client asking
    assert torch.equal(out, swarm["local"].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None))


def test_refused_push_falls_back_to_the_client_relaying(swarm):
    """The second server refuses pushes from anyone but the upstream its client named: the first reports the push
    failed, the client relays the step itself, and the result is the same as a pushed step's."""
    from swarm.blocks.span import BlockSpan
    from swarm.compression import deserialize_tensor, serialize_tensor
    from swarm.rpc.client import Stream

    manager = swarm["model"].get_remote().manager
    first, second = swarm["servers"]
    hidden = torch.randn(1, 5, 64)
    expected = BlockSpan.from_pretrained(str(swarm["path"]), 0, 6)(hidden, torch.arange(5)[None])

    async def one_step(upstream_of_second: str) -> tuple[bool, torch.Tensor]:
        streams = [await Stream.open(manager.p2p, s.peer_id, protocol.INFERENCE, 10) for s in (first, second)]
        try:
            spans = [(0, 3), (3, 6)]
            ids = []
            for stream, (start, end), upstream in zip(streams, spans, (None, upstream_of_second), strict=True):
                reply = await stream.request({"type": "open", "start": start, "end": end, "max_length": 8,
                                              "upstream": upstream}, timeout=10)
                ids.append(reply["session_id"])
            await streams[0].request({"type": "link", "downstream": {"peer": second.peer_id, "session_id": ids[1],
                                                                     "start": 3, "end": 6}}, timeout=10)
            step = {"type": "step", "position": 0, "step_id": 1, "push": True,
                    "position_ids": serialize_tensor(torch.arange(5)[None])}
            await streams[0].send({**step, "session_id": ids[0], "start": 0, "end": 3,
                                   "hidden": serialize_tensor(hidden)})
            reply = await streams[0].receive(10)
            assert reply["pushing"] is True
            pushed = (await streams[0].receive(10))["pushed"]
            if not pushed:  # relay, as the client does
                await streams[1].send({**step, "session_id": ids[1], "start": 3, "end": 6, "hidden": reply["hidden"]})
            return pushed, deserialize_tensor((await streams[1].receive(10))["hidden"])
        finally:
            for stream in streams:
                stream.close()

    pushed, via_push = manager.loop.run(one_step(first.peer_id))
    refused, via_relay = manager.loop.run(one_step("12D3KooWNotTheRightUpstreamPeerIdXXXXXXXXXXXXXXXXXX"))
    assert pushed and not refused
    assert torch.equal(via_push, via_relay)
    assert torch.allclose(via_push, expected, atol=1e-5)


# ---- Petals users' habits (issue: a Petals user's code runs unchanged)


def test_generate_none_continues_the_session_from_its_last_token(swarm):
    model, local = swarm["model"], swarm["local"]
    ids = prompt(6, seed=3)
    greedy = dict(do_sample=False, eos_token_id=None)
    with model.inference_session(max_length=40) as session:
        first = model.generate(ids, max_new_tokens=4, **greedy)
        more = model.generate(None, max_new_tokens=5, **greedy)  # Petals: go on from where the session stopped
        assert session.position == ids.shape[1] + 4 + 5 - 1  # the newest token is not fed yet
    assert torch.equal(more[:, : first.shape[1]], first)
    assert torch.equal(more, local.generate(ids, max_new_tokens=9, **greedy))


def test_generate_with_session_argument_and_zero_length_steps(swarm):
    """``generate(..., session=sess)`` with a session this thread did not open (here: held open by another thread)."""
    model, local = swarm["model"], swarm["local"]
    ids = prompt(5, seed=4)
    greedy = dict(do_sample=False, eos_token_id=None)
    opened, release = queue.Queue(), threading.Event()

    def hold() -> None:
        with model.inference_session(max_length=40) as held:
            opened.put(held)
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        session = opened.get(timeout=60)
        assert model.get_remote().active_session is None  # not this thread's
        model.generate(ids, session=session, max_new_tokens=3, **greedy)
        out = model.generate(None, session=session, max_new_tokens=3, **greedy)
        empty = torch.zeros(1, 0, model.config.hidden_size)
        assert session.step(empty, torch.zeros(1, 0, dtype=torch.long)).shape == empty.shape  # a no-op
        assert model.get_remote().active_session is None  # given for those calls only
    finally:
        release.set()
        holder.join(60)
    assert torch.equal(out, local.generate(ids, max_new_tokens=6, **greedy))
    with pytest.raises(RuntimeError, match="closed"):
        model.generate(ids, session=session, max_new_tokens=2, **greedy)


def test_setting_the_position_rewinds_and_checks_stay_honest(tiny_model, tmp_path):
    """Petals users go back with ``session.position = k``: the histories kept for replays and redundant checks are cut
    too, so two honest replicas checking each other agree (a stale history once struck both)."""
    from swarm.local_swarm import LocalSwarm

    path = tiny_model("llama")
    with LocalSwarm(tmp_path) as launcher:
        first = launcher.start_server_in_process(path, "0:3", [])
        for blocks in ("0:3", "3:6", "3:6"):
            launcher.start_server_in_process(path, blocks, [first.maddr])
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none",
                                                                 verify_probability=1.0)
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        greedy = dict(do_sample=False, eos_token_id=None)
        ids = prompt(8, seed=5)
        try:
            with model.inference_session(max_length=40) as session:
                model.generate(ids, max_new_tokens=6, **greedy)
                session.position = 8  # back to the end of the prompt
                assert session.position == 8 and session.position_ids.shape[1] == 8
                assert all(hop.inputs.shape[1] == 8 for hop in session.hops if hop.inputs is not None)
                again = model.generate(torch.cat([ids, prompt(2, seed=6)], dim=1), max_new_tokens=4, **greedy)
                with pytest.raises(ValueError, match="cannot rewind to 20"):
                    session.position = 20
            checked = [verdict for verdict in session.checks if not verdict.skipped]
            assert checked and all(verdict.agreed and not verdict.struck for verdict in checked)
            assert model.get_remote().manager.strikes_given == 0
            assert torch.equal(again, local.generate(torch.cat([ids, prompt(2, seed=6)], dim=1), max_new_tokens=4,
                                                     **greedy))
        finally:
            model.shutdown()


def test_remote_layers_index_and_slice_like_a_list(swarm):
    """``model.model.layers`` as Petals users use it: len, indexing, slices; forward (positions inferred), backward
    and inference sessions through a slice, equal to the same blocks run locally."""
    from swarm import BlockSpan

    layers = swarm["model"].model.layers
    assert len(layers) == 6 and len(layers[3:6]) == 3 and len(layers[-1]) == 1 and len(list(layers)) == 6
    with pytest.raises(IndexError):
        layers[6]
    with pytest.raises(IndexError):
        layers[4:2]
    size = swarm["model"].config.hidden_size
    hidden = torch.randn(2, 5, size, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(5).expand(2, 5)
    for start, end in ((3, 6), (1, 5), (2, 3)):  # one server, two servers, one block
        local = BlockSpan.from_pretrained(str(swarm["path"]), start, end)
        local_in, remote_in = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
        expected = local(local_in, positions)
        output = layers[start:end](remote_in)  # position ids inferred
        assert torch.allclose(output, expected, atol=1e-5), (start, end)
        expected.square().sum().backward()
        output.square().sum().backward()
        assert torch.allclose(remote_in.grad, local_in.grad, atol=1e-4), (start, end)

    tail = layers[3:6]
    with torch.no_grad():
        expected = BlockSpan.from_pretrained(str(swarm["path"]), 3, 6)(hidden, positions)
        with tail.inference_session(max_length=8) as session:
            first = session.step(hidden[:, :4], positions[:, :4])
            second = tail(hidden[:, 4:])  # inside the session: the next position, 4
            assert session.position == 5
    assert torch.allclose(torch.cat([first, second], dim=1), expected, atol=1e-4)


# ---- speculative generation


def _lookup_oracle(reference: torch.Tensor, prompt_length: int, draft_tokens: int) -> tuple[int, int]:
    """Steps and accepted drafts that prompt-lookup speculation must take to produce ``reference`` (greedy)."""
    from swarm.client.speculative import PromptLookup

    lookup, generated, steps, accepted = PromptLookup(), 1, 0, 0
    new_tokens = reference.shape[0] - prompt_length
    while generated < new_tokens:
        count = min(draft_tokens, new_tokens - generated - 1)
        drafts = lookup(reference[: prompt_length + generated], count)[:count]
        truth = reference[prompt_length + generated:][: len(drafts)]
        right = int((drafts == truth).long().cumprod(0).sum())
        steps, accepted, generated = steps + 1, accepted + right, generated + min(right + 1, new_tokens - generated)
    return steps, accepted


def test_prompt_lookup_speculation_equals_greedy_and_checks_several_tokens_per_step(swarm):
    model, local = swarm["model"], swarm["local"]
    greedy = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    # a repetitive text (random weights rarely copy): the one, of a few, where the lookup is right most often
    candidates = [prompt(length=8, seed=seed).repeat(1, 3) for seed in range(12)]
    references = [local.generate(ids, **greedy)[0] for ids in candidates]
    oracles = [_lookup_oracle(ref, ids.shape[1], 5) for ids, ref in zip(candidates, references, strict=True)]
    best = max(range(len(candidates)), key=lambda i: oracles[i][1])
    assert oracles[best][1] > 0
    out = model.generate(candidates[best], prompt_lookup_num_tokens=5, **greedy)
    assert torch.equal(out[0], references[best])
    stats = model.last_speculation
    assert stats.new_tokens == 24 and sum(stats.per_step) == 23  # the first token comes from the prefill
    assert (stats.steps, stats.accepted) == oracles[best] and stats.drafted >= stats.accepted


def test_a_draft_model_speculates_and_rejected_drafts_rewind_the_servers(swarm, tiny_model, tmp_path):
    from tiny_models import save_tiny_model

    from swarm import AutoDistributedSpeculativeModel

    local, greedy = swarm["local"], dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    same = AutoModelForCausalLM.from_pretrained(swarm["path"]).eval()  # always right: every draft is accepted
    other = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "draft", seed=5)).eval()
    model = AutoDistributedSpeculativeModel.from_pretrained(swarm["path"], small_model=same,
                                                            initial_peers=swarm["peers"], compression="none")
    try:
        out = model.generate(prompt(seed=8), num_assistant_tokens=4, **greedy)
        assert torch.equal(out, local.generate(prompt(seed=8), **greedy))
        # 19 tokens after the prefill's, each step 4 drafts + 1: 4 steps instead of 19
        assert model.last_speculation.steps == 4 and model.last_speculation.acceptance_rate == 1.0
        # A draft that is mostly wrong: every rejected draft was computed by the servers and must be forgotten,
        # or the next positions would attend to it and the output would drift from greedy.
        with model.inference_session(max_length=64) as session:
            out = model.generate(prompt(seed=9), assistant_model=other, **greedy)
            assert torch.equal(out, local.generate(prompt(seed=9), **greedy))
            assert model.last_speculation.accepted < model.last_speculation.drafted
            assert session.position == out.shape[1] - 1  # the newest token is not fed yet
            more = model.generate(None, assistant_model=other, max_new_tokens=6, do_sample=False, eos_token_id=None)
            assert torch.equal(more, local.generate(out, max_new_tokens=6, do_sample=False, eos_token_id=None))
        with pytest.raises(ValueError, match="greedy decoding only.*do_sample"):
            model.generate(prompt(seed=9), do_sample=True, max_new_tokens=4)
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(prompt(seed=9, batch=2), max_new_tokens=4, do_sample=False)
    finally:
        model.shutdown()


def test_a_server_slower_than_it_claims_loses_its_place_with_push_on(launcher, tiny_model, monkeypatch):
    """A server announcing 1e6 steps/s but taking ~50 ms per layer is chosen first; the decode steps this client
    sees it take (pushed from server to server, as by default) raise its cost, and the next route avoids it."""
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "3:6", [], "--throughput", "100")
    monkeypatch.setenv("SWARM_TEST_FAULT", "slow-pieces:0.05")  # read once, by the next server's handler
    slow = launcher.start_server_in_process(path, "0:3", [first.maddr], "--throughput", "1000000")
    monkeypatch.delenv("SWARM_TEST_FAULT")
    # it claims 50 ms a step: what puts the liar first must outweigh the noise of the client's single ping to each
    # (claiming 10 ms, a busy host's ping spike once routed around the liar), and stay below its ~150 ms steps
    honest = launcher.start_server_in_process(path, "0:3", [first.maddr], "--throughput", "20")
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none",
                                                            model_id="tiny-llama", verify_probability=0.0)
    try:
        assert model.route()[0].peer_id == slow.peer_id
        with model.inference_session(max_length=32) as session:
            model.generate(prompt(seed=5), max_new_tokens=8, do_sample=False)
            assert session.chain[0].peer_id == slow.peer_id  # it did the work, slowly
        assert model.route()[0].peer_id == honest.peer_id
    finally:
        model.shutdown()
