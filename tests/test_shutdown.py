"""Servers leaving: a clean SIGTERM announces offline and clients fail fast; a SIGKILL mid-session is routed
around by replaying the session on another server, with the same tokens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psutil
import pytest
import torch
from hivemind.p2p import P2P
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, MissingBlocksError
from swarm.dht.node import start_dht, stop_dht
from swarm.dht.records import fetch_block_infos
from swarm.dht.schema import ServerState
from swarm.utils.loop_thread import LoopThread

GREEDY = dict(do_sample=False, eos_token_id=None)


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))


def test_sigterm_announces_offline_and_clients_fail_fast(launcher, tiny_model):
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:3", [])
    second = launcher.start_server(path, "3:6", [first.maddr])
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr])
    loop = LoopThread()
    p2p, node = loop.run(start_dht([first.maddr], host="127.0.0.1", client_mode=True))
    try:
        model.generate(prompt(), max_new_tokens=3, **GREEDY)  # the client has seen both servers

        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0  # a clean exit, after announcing itself offline:
        infos = loop.run(fetch_block_infos(node, "tiny-llama", [3]))[0]
        assert infos[second.peer_id].state == ServerState.OFFLINE

        started = time.monotonic()
        with pytest.raises(MissingBlocksError, match="no server holds block 3 of tiny-llama"):
            model.generate(prompt(), max_new_tokens=3, **GREEDY)
        assert time.monotonic() - started < 15
    finally:
        model.shutdown()
        loop.run(stop_dht(p2p, node))
        loop.stop()


def p2pd_of(process) -> psutil.Process:
    (daemon,) = [child for child in psutil.Process(process.proc.pid).children() if child.name() == "p2pd"]
    return daemon


def test_ctrl_c_in_a_terminal_announces_offline(launcher, tiny_model):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group. p2pd runs in a group of its own, so
    it survives long enough for the server to announce itself offline through it, and then goes with the server."""
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:3", [])
    second = launcher.start_server(path, "3:6", [first.maddr])
    daemon = p2pd_of(second)
    loop = LoopThread()
    p2p, node = loop.run(start_dht([first.maddr], host="127.0.0.1", client_mode=True))
    try:
        os.killpg(second.proc.pid, signal.SIGINT)  # the server's process group, as a terminal does
        assert second.proc.wait(30) == 0  # a clean exit, after announcing itself offline:
        infos = loop.run(fetch_block_infos(node, "tiny-llama", [3]))[0]
        assert infos[second.peer_id].state == ServerState.OFFLINE
        daemon.wait(10)  # raises psutil.TimeoutExpired if the daemon outlived its server
    finally:
        loop.run(stop_dht(p2p, node))
        loop.stop()


def test_p2pd_dies_with_a_killed_server(launcher, tiny_model):
    server = launcher.start_server(tiny_model("llama"), "0:6", [])
    daemon = p2pd_of(server)
    server.proc.kill()  # the server alone (not its group): the kernel must take its daemon down with it
    assert server.proc.wait(10) == -signal.SIGKILL
    with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
        daemon.wait(10)
    assert not daemon.is_running(), "p2pd outlived its killed server"


def test_a_start_interrupted_while_its_daemon_comes_up_leaves_no_daemon(monkeypatch):
    """Ctrl-C or SIGTERM during a client's open cancels ``start_dht`` while hivemind waits for its new daemon: that
    daemon has no control connection yet, so nothing else would end it (it lingered past its process's exit)."""
    read_outputs = P2P._read_outputs

    async def slow_to_report_ready(self, ready):  # the daemon runs, but its start waits on: no race with the test
        await asyncio.sleep(60)
        await read_outputs(self, ready)

    monkeypatch.setattr(P2P, "_read_outputs", slow_to_report_ready)
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    loop = LoopThread()
    daemons: list[psutil.Process] = []
    try:
        future = asyncio.run_coroutine_threadsafe(start_dht([], host="127.0.0.1", client_mode=True), loop.loop)
        deadline = time.monotonic() + 30
        while not daemons and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                daemons = [child for child in me.children() if child.pid not in before and child.name() == "p2pd"]
            time.sleep(0.01)
        assert daemons, "start_dht started no p2pd"
        assert not future.done()
        future.cancel()
        loop.stop()  # at once, as a client's open does when interrupted (swarm/client/node.py)
        _, alive = psutil.wait_procs(daemons, timeout=10)
        assert not alive, "p2pd outlived its cancelled start"
    finally:
        loop.stop()
        for daemon in daemons:  # when the test fails: nothing outlives it
            with contextlib.suppress(psutil.NoSuchProcess):
                daemon.kill()


def test_killed_server_is_replaced_mid_session_with_the_same_tokens(launcher, tiny_model):
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:3", [])
    replicas = [launcher.start_server(path, "3:6", [first.maddr], wait=False) for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        ids = prompt(seed=7)
        with model.inference_session(max_length=40) as session:
            partial = model.generate(ids, max_new_tokens=8, **GREEDY)
            victim = next(r for r in replicas if r.peer_id == session.chain[-1].peer_id)
            victim.signal(signal.SIGKILL)  # the server and its p2pd, no goodbye
            victim.proc.wait(10)
            full = model.generate(partial, max_new_tokens=8, **GREEDY)
            assert session.chain[-1].peer_id != victim.peer_id
        assert torch.equal(full, local.generate(ids, max_new_tokens=16, **GREEDY))
    finally:
        model.shutdown()
