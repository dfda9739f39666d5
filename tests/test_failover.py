"""Failover on a 30-block model with redundant servers: a server killed, stalled or erring in the middle of a
generation is replaced, the session replayed on the replacement, and the tokens equal local greedy decoding."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, StoppingCriteria

from swarm import AutoDistributedModelForCausalLM, MissingBlocksError
from swarm.local_swarm import LocalSwarm

GREEDY = dict(do_sample=False, eos_token_id=None)
FAST, SLOW = "1000", "1"  # --throughput: routing prefers the fast replica, so the test knows which one is in use


@pytest.fixture
def swarm(tiny_model, tmp_path):
    """Blocks 0:10 and 20:30 once; 10:20 on a fast replica and a slow one."""
    path = tiny_model("llama30")
    with LocalSwarm(tmp_path) as launcher:
        first = launcher.start_server(path, "0:10", [])

        def start(blocks: str, *extra: str, env: dict | None = None):
            return launcher.start_server(path, blocks, [first.maddr], *extra, wait=False, env=env)

        yield {"path": path, "launcher": launcher, "peers": [first.maddr], "start": start,
               "local": AutoModelForCausalLM.from_pretrained(path).eval()}


class AtLength(StoppingCriteria):
    """Runs ``action`` once, when the sequence reaches ``length``; never stops generation."""

    def __init__(self, length: int, action):
        self.length, self.action, self.fired_at = length, action, None

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] == self.length and self.fired_at is None:
            self.action()
            self.fired_at = time.monotonic()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fault", ["sigkill", "stall", "error"])
def test_generation_survives_a_failing_server(swarm, fault):
    env = {"SWARM_TEST_FAULT": "error-after-steps:6"} if fault == "error" else None
    fast = swarm["start"]("10:20", "--throughput", FAST, env=env)
    others = [swarm["start"]("10:20", "--throughput", SLOW), swarm["start"]("20:30")]
    for process in [fast, *others]:
        process.wait_ready()
    # a generous request timeout, as by default: a frozen server must be given up long before it
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                            compression="none", request_timeout=30.0)
    try:
        def break_server() -> None:
            assert model.get_remote().active_session.chain[1].peer_id == fast.peer_id
            if fault == "sigkill":
                fast.signal(signal.SIGKILL)
            elif fault == "stall":
                fast.proc.send_signal(signal.SIGSTOP)  # alive but silent: only its silence tells

        ids = prompt()
        trigger = AtLength(ids.shape[1] + 5, break_server)
        next_token = AtLength(ids.shape[1] + 6, lambda: None)
        with model.inference_session(max_length=64) as session:
            out = model.generate(ids, max_new_tokens=16, stopping_criteria=[trigger, next_token], **GREEDY)
            assert session.chain[1].peer_id != fast.peer_id  # the slow replica took over blocks 10:20
        assert trigger.fired_at is not None
        assert torch.equal(out, swarm["local"].generate(ids, max_new_tokens=16, **GREEDY))
        # the stalled step waited for the hop's stall bound (2 s here), not for the 30 s request timeout
        assert next_token.fired_at - trigger.fired_at < 10.0, next_token.fired_at - trigger.fired_at
    finally:
        if fault == "stall":
            fast.proc.send_signal(signal.SIGCONT)
        model.shutdown()


def test_a_black_hole_costs_one_short_stall_then_is_avoided(swarm):
    """A server that announces itself far faster than the others, accepts sessions and never answers: the first
    generation waits for it only as long as its claimed speed allows (5 s at least), then fails over; the next one
    does not go near it."""
    hole = swarm["start"]("10:20", "--throughput", "1000000", env={"SWARM_TEST_FAULT": "black-hole"})
    others = [swarm["start"]("10:20", "--throughput", SLOW), swarm["start"]("20:30")]
    for process in [hole, *others]:
        process.wait_ready()
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                            compression="none", request_timeout=60.0)
    try:
        assert model.route()[1].peer_id == hole.peer_id  # its claim makes it the first choice
        expected = swarm["local"].generate(prompt(2), max_new_tokens=4, **GREEDY)
        started = time.monotonic()
        assert torch.equal(model.generate(prompt(2), max_new_tokens=4, **GREEDY), expected)
        first = time.monotonic() - started
        started = time.monotonic()
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(prompt(2), max_new_tokens=4, **GREEDY), expected)
            assert hole.peer_id not in [span.peer_id for span in session.chain]
        second = time.monotonic() - started
        assert first < 15.0, first  # one stall of about 5 s, not the 60 s request timeout
        assert second < 5.0, second
    finally:
        model.shutdown()


def test_backward_is_retried_on_another_server(swarm):
    fast = swarm["start"]("10:20", "--throughput", FAST)
    others = [swarm["start"]("10:20", "--throughput", SLOW), swarm["start"]("20:30")]
    for process in [fast, *others]:
        process.wait_ready()
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"],
                                                            compression="none")
    local = swarm["local"]
    try:
        ids = prompt(seed=1)
        embeddings = model.get_input_embeddings().weight.requires_grad_(True)
        loss = model(ids, labels=ids).loss  # went through the fast replica
        fast.signal(signal.SIGKILL)
        loss.backward()  # its backward is recomputed on the slow one
        local(ids, labels=ids).loss.backward()
        assert torch.allclose(embeddings.grad, local.get_input_embeddings().weight.grad, atol=1e-4, rtol=0)
    finally:
        model.shutdown()


def test_no_server_left_for_a_block_fails_within_a_bound(swarm):
    replicas = [swarm["start"]("10:30") for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    model = AutoDistributedModelForCausalLM.from_pretrained(swarm["path"], initial_peers=swarm["peers"])
    try:
        model.generate(prompt(), max_new_tokens=2, **GREEDY)
        for replica in replicas:
            replica.signal(signal.SIGKILL)  # their records stay online in the DHT until they expire
        started = time.monotonic()
        with pytest.raises(MissingBlocksError, match="no server holds block 10 of tiny-llama30"):
            model.generate(prompt(), max_new_tokens=2, **GREEDY)
        assert time.monotonic() - started < 30
    finally:
        model.shutdown()


def test_an_error_the_request_causes_is_reported_and_bans_nobody(tiny_model, tmp_path):
    """A server refusing a request (here: over its message size limit) with no other server to try: the caller
    gets the server's own message, not a routing error, and the server is not banned for it."""
    path = tiny_model("llama")
    with LocalSwarm(tmp_path) as launcher:
        first = launcher.start_server(path, "0:6", [], "--max-message-mb", "0.05")
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr],
                                                                compression="none")
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        try:
            with pytest.raises(RuntimeError, match="exceeds the limit"):
                model(torch.randint(3, VOCAB, (1, 400)))
            with pytest.raises(RuntimeError, match="exceeds the limit"):
                model.generate(torch.randint(3, VOCAB, (1, 400)), max_new_tokens=2, **GREEDY)
            assert not model.get_remote().manager.banned()
            ids = torch.randint(3, VOCAB, (1, 6))  # small requests still go through
            assert torch.equal(model.generate(ids, max_new_tokens=4, **GREEDY),
                               local.generate(ids, max_new_tokens=4, **GREEDY))
        finally:
            model.shutdown()


def test_restarted_servers_are_chosen_again(tiny_model, tmp_path):
    """Two replicas of blocks 0:3; in each generation the one in use is killed mid-way and restarted at once with
    its identity. Its ban must heal when it announces its new run: at the second kill, the other replica is the
    one that restarted (and was banned), and nothing else holds those blocks."""
    path = tiny_model("llama")
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    with LocalSwarm(tmp_path) as launcher:
        peers = [launcher.start_dht().maddr]  # a bootstrap node that stays up while servers come and go
        keys = {name: tmp_path / f"{name}.key" for name in ("a1", "a2")}

        def start(name: str):
            return launcher.start_server(path, "0:3", peers, "--identity", str(keys[name]), wait=False)

        servers = {name: start(name) for name in keys}
        rest = launcher.start_server_in_process(path, "3:6", peers)
        for process in servers.values():
            process.wait_ready()
        by_peer = {process.peer_id: name for name, process in servers.items()}
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, compression="none",
                                                                request_timeout=10.0)
        try:
            used = []
            for run in range(2):
                killed = []

                def kill_and_restart(killed: list = killed) -> None:
                    name = by_peer[model.get_remote().active_session.chain[0].peer_id]
                    servers[name].signal(signal.SIGKILL)
                    servers[name] = start(name)  # immediately, under the same identity
                    killed.append(name)

                ids = prompt(seed=run)
                trigger = AtLength(ids.shape[1] + 3, kill_and_restart)
                with model.inference_session(max_length=32):
                    out = model.generate(ids, max_new_tokens=8, stopping_criteria=[trigger], **GREEDY)
                assert killed, f"run {run}: nothing was killed"
                assert torch.equal(out, local.generate(ids, max_new_tokens=8, **GREEDY)), f"run {run}"
                used.append(killed[0])
                servers[killed[0]].wait_ready()  # both up again before the next run
            assert used[0] != used[1]  # the second run used, and lost, the other replica
            assert rest.peer_id not in model.get_remote().manager.banned()
        finally:
            model.shutdown()
