"""Generation, forward and training through real servers equal the local model, for every supported family."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from tiny_models import FAMILIES, VOCAB
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from swarm import AutoDistributedModel, AutoDistributedModelForCausalLM, RoutingPolicy
from swarm.local_swarm import LocalSwarm

ATOL = 1e-4  # float32, no compression: differences are float rounding only (observed <= 5e-6)


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, tiny_model, tmp_path_factory):
    """Servers [0:2] [2:4] [4:6] and [0:4]: the greedy route takes 2 hops, 3 when [0:4] is blocked.

    Every server announces the same fixed speed (0.1 s a step per span), so the route's shape depends on the hop
    count only, not on speeds measured while other tests load the machine (a measured [0:4] server can come out
    slower than [0:2] + [2:4] together)."""
    path = tiny_model(request.param)
    launcher = LocalSwarm(tmp_path_factory.mktemp(f"swarm-{request.param}"))
    speed = ("--throughput", "10")
    try:
        first = launcher.start_server_in_process(path, "0:2", [], *speed)
        others = [launcher.start_server_in_process(path, blocks, [first.maddr], *speed, wait=False)
                  for blocks in ("2:4", "4:6", "0:4")]
        for process in others:
            process.wait_ready()
        two_hops = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr],
                                                                   compression="none")
        three_hops = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr],
                                                                     routing_policy=RoutingPolicy(
                                                                         blocked_servers=[others[2].peer_id]),
                                                                     compression="none")
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        yield {"path": path, "peers": [first.maddr], "local": local, "two_hops": two_hops, "three_hops": three_hops,
               "other_peers": [others[0].maddr]}
        two_hops.shutdown()
        three_hops.shutdown()
    finally:
        launcher.stop_all()


def _prompts(batch: int, length: int, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        ids[-1, :pad], mask[-1, :pad] = 0, 0  # left padding on the last row
    return ids, mask


@pytest.mark.parametrize("family_swarm", ["llama"], indirect=True)
def test_models_of_one_process_share_its_connection_to_a_swarm(family_swarm):
    """Models a process opens for one swarm share one p2pd and DHT node (a daemon costs ~0.35 CPU-s to start, and
    its own connection to every server): one shut down leaves the others generating; the last stops the daemon."""
    two_hops, path, local = family_swarm["two_hops"], family_swarm["path"], family_swarm["local"]
    node = two_hops.get_remote().manager.node
    assert family_swarm["three_hops"].get_remote().manager.node is node
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=family_swarm["peers"])
    assert model.get_remote().manager.node is node and node.users == 3
    daemon = psutil.Process(node.p2p._child.pid)
    model.shutdown()
    model.shutdown()  # a second shutdown lets go of nothing more
    assert node.users == 2 and daemon.is_running()
    ids, _ = _prompts(1, 5)
    assert torch.equal(two_hops.generate(ids, max_new_tokens=3, do_sample=False),
                       local.generate(ids, max_new_tokens=3, do_sample=False))
    # bootstrapped from other peers: a node of its own, stopped with its only model
    alone = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=family_swarm["other_peers"])
    own = alone.get_remote().manager.node
    assert own is not node and own.users == 1
    own_daemon = psutil.Process(own.p2p._child.pid)
    # its daemon killed: the next model of that swarm gets a new node instead of the dead one
    own_daemon.kill()
    own_daemon.wait(10)
    deadline = time.monotonic() + 10
    while own.alive and time.monotonic() < deadline:  # hivemind's loop notices the exit
        time.sleep(0.05)
    again = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=family_swarm["other_peers"],
                                                            compression="none")
    fresh = again.get_remote().manager.node
    assert fresh is not own and fresh.users == 1
    assert torch.equal(again.generate(ids, max_new_tokens=3, do_sample=False),
                       local.generate(ids, max_new_tokens=3, do_sample=False))
    fresh_daemon = psutil.Process(fresh.p2p._child.pid)
    alone.shutdown()
    again.shutdown()
    _, running = psutil.wait_procs([fresh_daemon], timeout=10)
    assert not running and daemon.is_running()


def test_routes_have_two_and_three_hops(family_swarm):
    assert [(s.start, s.end) for s in family_swarm["two_hops"].route()] == [(0, 4), (4, 6)]
    assert [(s.start, s.end) for s in family_swarm["three_hops"].route()] == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.parametrize("hops", ["two_hops", "three_hops"])
def test_greedy_generate_equals_local(family_swarm, hops):
    model, local = family_swarm[hops], family_swarm["local"]
    ids, mask = _prompts(1, 6)
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(out, local.generate(ids, attention_mask=mask, **kwargs))


def test_left_padded_batch_equals_local(family_swarm):
    model, local = family_swarm["three_hops"], family_swarm["local"]
    ids, mask = _prompts(2, 8, pad=3, seed=1)
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
    out, ref = model.generate(ids, attention_mask=mask, **kwargs), local.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) < ATOL


def test_forward_logits_and_gradients_match_local(family_swarm):
    model, local = family_swarm["two_hops"], family_swarm["local"]
    ids, mask = _prompts(2, 10, pad=2, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    embeddings, local_embeddings = model.get_input_embeddings().weight, local.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    try:
        out = model(ids, attention_mask=mask, labels=labels)
        ref = local(ids, attention_mask=mask, labels=labels)
        valid = mask.bool()
        assert torch.allclose(out.logits[valid], ref.logits[valid], atol=ATOL, rtol=0)
        assert abs(out.loss.item() - ref.loss.item()) < ATOL
        out.loss.backward()
        ref.loss.backward()
        assert torch.allclose(embeddings.grad, local_embeddings.grad, atol=ATOL, rtol=0)
        assert embeddings.grad.abs().sum() > 0
    finally:
        embeddings.requires_grad_(False)
        embeddings.grad = local_embeddings.grad = None


def test_hidden_states_model_equals_local(family_swarm):
    model = AutoDistributedModel.from_pretrained(family_swarm["path"], initial_peers=family_swarm["peers"],
                                                 compression="none")
    try:
        ids, mask = _prompts(2, 7, pad=2, seed=3)
        with torch.no_grad():
            hidden = model(ids, attention_mask=mask).last_hidden_state
            ref = family_swarm["local"](ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(hidden[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)
    finally:
        model.shutdown()


def test_generate_from_inputs_embeds_equals_local(family_swarm):
    """generate(inputs_embeds=...): the history is embeddings, then generated tokens (which transformers passes
    without the embedded part); only the unseen positions go to the servers."""
    ids, _ = _prompts(1, 7, seed=5)
    model, local = family_swarm["two_hops"], family_swarm["local"]
    embeds = local.get_input_embeddings()(ids).detach()
    out = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(out, local.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False,
                                           eos_token_id=None))


def test_edited_history_in_a_session_equals_local(family_swarm):
    """A session whose next input edits its history rewinds to the common prefix. Qwen2's sliding-window layers
    (window 16 here) cannot be cut back once 20 positions went through: the hop is rebuilt from the history the
    client keeps, on the same server, which is not banned for it."""
    model, local = family_swarm["two_hops"], family_swarm["local"]
    greedy = dict(do_sample=False, eos_token_id=None)
    ids, _ = _prompts(1, 12, seed=6)
    with model.inference_session(max_length=64):
        first = model.generate(ids, max_new_tokens=8, **greedy)
        edited = torch.cat([first[:, :5], _prompts(1, 3, seed=7)[0]], dim=1)
        again = model.generate(edited, max_new_tokens=4, **greedy)
    assert torch.equal(again, local.generate(edited, max_new_tokens=4, **greedy))
    assert not model.get_remote().manager.banned()


@pytest.mark.parametrize("family_swarm", ["llama"], indirect=True)
def test_the_clients_part_of_a_decode_step_runs_on_one_thread(family_swarm):
    """Generating up to four rows, the client's per-token work (LM head, logits processors) runs on the caller's
    thread alone: a thread pool would wait for cores the servers take turns on. A forward of more positions, or a
    generation of more rows, keeps the caller's thread count, and so does the caller after the call."""
    model = family_swarm["two_hops"]
    heads: list[tuple[int, int]] = []  # (positions, torch threads) of each call of the LM head
    processors: list[int] = []  # torch threads of each call of a logits processor

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            processors.append(torch.get_num_threads())
            return scores

    handle = model.lm_head.register_forward_pre_hook(
        lambda module, args: heads.append((args[0].shape[:2].numel(), torch.get_num_threads())))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=None,
                      logits_processor=LogitsProcessorList([Record()]))
        ids, mask = _prompts(1, 6)
        model.generate(ids, attention_mask=mask, **kwargs)
        one_row = heads[:], processors[:]
        heads.clear(), processors.clear()
        ids, mask = _prompts(5, 6)
        model.generate(ids, attention_mask=mask, **kwargs)
        five_rows = heads[:], processors[:]
        heads.clear()
        model(torch.cat([ids[:1], ids[:1]], dim=1))  # a forward of 12 positions
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
        handle.remove()
    assert one_row == ([(1, 1)] * 3, [1] * 3)  # the prefill's head sees its last position only
    assert five_rows == ([(5, 2)] * 3, [2] * 3)
    assert heads == [(12, 2)] and after == 2
