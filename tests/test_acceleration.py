"""acceleration="auto" and explicit methods through real servers: chosen, applied, recorded; output as promised."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.acceleration import History, Method, Outcome, Record, configure, save_dataset
from swarm.acceleration.learner import expert_rule

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def swarm_(launcher, tiny_model):
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:3", [])
    launcher.start_server_in_process(path, "3:6", [first.maddr])
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, local.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {"path": path, "peers": [first.maddr], "ids": ids, "expected": expected}


def client(swarm_, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(swarm_["path"], initial_peers=swarm_["peers"],
                                                           **options)


def seed_history(history: History, model, prompt_length: int) -> None:
    """A history around this very task where 8-bit on every link is fastest but flips tokens (quality 0.5), exact
    is next, and the rest are slower; tasks differ by prompt length so the confidence can be calibrated."""
    base = model._selector.features(1, prompt_length, NEW_TOKENS)
    for n, (prompt, chain) in enumerate(itertools.product([2, 4, 7, 12, 20, 33, 50, 80], [1, 2])):
        # routes of 1 or 2 servers; loopback's probed RTT and bandwidth jitter a lot, so the history spans a range
        spread = [0.2, 1.0, 5.0][n % 3]
        features = dataclasses.replace(base, prompt_length=prompt, chain_length=chain, rtt_ms=base.rtt_ms * spread,
                                       bandwidth_mbit=base.bandwidth_mbit / spread)
        for method, total, quality in (("blockwise8-ends", 0.5, 0.5), ("exact", 0.7, 1.0), ("float16", 1.0, 1.0),
                                       ("blockwise8", 1.1, 1.0), ("relay", 1.3, 1.0)):
            history.add(Record(f"seeded-{n}", features, method, Outcome(total / 4, total, 10.0, 1000, quality),
                               source="collected"))


def test_auto_chooses_applies_and_records_within_the_quality_floor(swarm_, tmp_path):
    history_path = tmp_path / "history.sqlite"
    model = client(swarm_, acceleration="auto", history_path=str(history_path), exploration=0.0, quality_floor=0.9)
    history = History(history_path)
    seed_history(history, model, swarm_["ids"].shape[1])
    out = model.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
    choice, features, outcome = model._selector.last
    assert choice.method == "exact" and choice.reason == "learned"  # the faster one breaks the floor
    assert 0 < choice.confidence <= 1
    assert torch.equal(out, swarm_["expected"])  # exact: the local model's tokens
    local = [r for r in history.records() if r.source == "local"]
    assert [r.method for r in local] == ["exact"]
    assert local[0].outcome.total_s > 0 and local[0].outcome.bytes > 0 and local[0].features == features
    assert model.get_remote().client_config.compression == "blockwise8"  # the method was this request's alone

    # the faster method, explicitly: applied (fewer bytes on the wire), recorded, the shared config untouched
    fast = client(swarm_, acceleration="blockwise8-ends", history_path=str(history_path))
    fast.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert fast._selector.last[0].reason == "explicit"
    records = {r.method: r for r in History(history_path).records() if r.source == "local"}
    assert set(records) == {"exact", "blockwise8-ends"}
    # 64-wide tiny model: message headers weigh, so 8-bit halves the bytes rather than quartering them
    assert records["blockwise8-ends"].outcome.bytes < 0.6 * records["exact"].outcome.bytes
    assert fast.get_remote().client_config.edge_compression is None
    model.shutdown()
    fast.shutdown()


def test_corrupt_history_falls_back_to_the_expert_rule(swarm_, tmp_path, caplog):
    history_path = tmp_path / "history.sqlite"
    history_path.write_bytes(b"not a database at all" * 64)
    model = client(swarm_, acceleration="auto", history_path=str(history_path), exploration=0.0)
    with caplog.at_level(logging.WARNING):
        out = model.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
    choice = model._selector.last[0]
    features = model._selector.last[1]
    assert choice.reason == "expert" and choice.method == expert_rule(features)
    assert "unreadable" in caplog.text and "expert rule" in caplog.text
    if choice.method == "exact":  # loopback is a LAN by the rule, unless a busy machine stretched the probe's RTT
        assert torch.equal(out, swarm_["expected"])
    assert out.shape == swarm_["expected"].shape
    model.shutdown()


def test_unknown_method_is_refused_at_load(swarm_):
    with pytest.raises(ValueError, match="unknown acceleration method 'turbo'"):
        client(swarm_, acceleration="turbo")


def test_local_blocks_and_chunked_prefill_keep_the_output_exact(swarm_):
    model = client(swarm_, compression="none")
    for method in (Method("local", compression="none", edge_compression="none", local_blocks=2),
                   Method("chunked", compression="none", edge_compression="none", prefill_chunk=3),
                   Method("relayed", compression="none", edge_compression="none", push=False),
                   Method("lookup", compression="none", edge_compression="none", prompt_lookup=4)):
        config = configure(model.get_remote().client_config, method)
        model.last_speculation = None
        with model.inference_session(max_length=64, config=config) as session:
            out = model.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
            assert session.first_block == method.local_blocks
        assert torch.equal(out, swarm_["expected"]), method.name
        # speculation ran where the method asked for it, and only there
        assert (model.last_speculation is not None) == bool(method.prompt_lookup), method.name
    # a sampled request cannot be speculated without changing what it asked for: the method is not offered
    assert not model._speculable(swarm_["ids"], {"do_sample": True})
    assert model._speculable(swarm_["ids"], {"do_sample": False, "max_new_tokens": 4})
    # the settings were this session's alone: the model's own are as they were
    config = model.get_remote().client_config
    assert model.model.local_span is None and model.get_remote().manager.first_block == 0
    assert (config.local_blocks, config.prefill_chunk, config.push, config.prompt_lookup_tokens) == (0, None, True, 0)
    model.shutdown()


def test_threads_generating_with_different_settings_keep_their_own(swarm_):
    """Two requests at once through one model, each with its own method's settings: neither sees the other's."""
    model = client(swarm_, compression="none")
    base = model.get_remote().client_config
    methods = [Method("local", compression="none", edge_compression="none", local_blocks=2),
               Method("relayed-chunked", compression="none", edge_compression="none", push=False, prefill_chunk=3)]
    outputs, seen, errors = {}, {}, []
    barrier = threading.Barrier(len(methods))

    def work(method: Method) -> None:
        try:
            with model.inference_session(max_length=64, config=configure(base, method)) as session:
                barrier.wait(timeout=30)  # both sessions open at once
                outputs[method.name] = model.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
                seen[method.name] = (session.first_block, session.config.push, session.config.prefill_chunk)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(method,)) for method in methods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    model.shutdown()
    assert not errors, errors
    assert seen == {"local": (2, True, None), "relayed-chunked": (0, False, 3)}
    assert all(torch.equal(out, swarm_["expected"]) for out in outputs.values()) and len(outputs) == 2
    assert (base.local_blocks, base.push, base.prefill_chunk) == (0, True, None)


def test_a_new_client_learns_from_the_summaries_servers_announce(swarm_, launcher, tmp_path):
    """A server announces a summary of its operator's history; a client with no history of its own learns from it."""
    probe = client(swarm_, acceleration="auto", history_path=str(tmp_path / "probe.sqlite"))
    seeded = History(tmp_path / "operator.sqlite")
    seed_history(seeded, probe, swarm_["ids"].shape[1])
    probe.shutdown()
    dataset = tmp_path / "operator.jsonl"
    save_dataset(seeded.records(), dataset)
    launcher.start_server_in_process(swarm_["path"], "0:6", swarm_["peers"], "--acceleration-history", str(dataset))

    model = client(swarm_, acceleration="auto", history_path=str(tmp_path / "new.sqlite"), exploration=0.0)
    out = model.generate(swarm_["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
    selector = model._selector
    assert len(selector.swarm_records) == len(seeded.records())
    assert {r.source for r in selector.swarm_records} == {"swarm"}
    assert selector.last[0].reason == "learned" and selector.last[0].method == "exact", selector.last[:2]
    assert torch.equal(out, swarm_["expected"])
    model.shutdown()
