"""Servers started with --num-blocks choose where the swarm needs them, re-cover blocks when a server leaves, and
move without killing the sessions open on their old blocks."""

from __future__ import annotations

import time

import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, RoutingPolicy
from swarm.dht.node import start_dht, stop_dht
from swarm.dht.records import fetch_block_infos
from swarm.dht.schema import ServerState
from swarm.local_swarm import LocalSwarm
from swarm.utils.loop_thread import LoopThread

AUTO = ("--throughput", "100", "--update-period", "1", "--balance-period", "2")


class DhtReader:
    def __init__(self, peers: list[str]):
        self.loop = LoopThread()
        self.p2p, self.node = self.loop.run(start_dht(peers, host="127.0.0.1", client_mode=True))

    def online_spans(self, model_id: str, num_blocks: int) -> dict[str, tuple[int, int]]:
        per_block = self.loop.run(fetch_block_infos(self.node, model_id, list(range(num_blocks))))
        return {peer: (info.start, info.end) for block in per_block for peer, info in block.items()
                if info.state == ServerState.ONLINE}

    def wait_for(self, predicate, model_id: str, num_blocks: int, timeout: float) -> dict[str, tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while True:
            spans = self.online_spans(model_id, num_blocks)
            if predicate(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)

    def close(self) -> None:
        self.loop.run(stop_dht(self.p2p, self.node))
        self.loop.stop()


def uncovered(spans: dict[str, tuple[int, int]], num_blocks: int) -> set[int]:
    return set(range(num_blocks)) - {b for start, end in spans.values() for b in range(start, end)}


def ready_span(server) -> tuple[int, int]:
    return server.server.start, server.server.end  # the span it serves now (in-process servers)


def test_num_blocks_servers_cover_the_model_and_recover_a_lost_span(tiny_model, tmp_path):
    path = tiny_model("llama")
    with LocalSwarm(tmp_path) as launcher:
        servers = [launcher.start_server_in_process(path, None, [], "--num-blocks", "2", *AUTO)]
        for _ in range(2):  # one after another, each seeing the previous ones
            servers.append(launcher.start_server_in_process(path, None, [servers[0].maddr], "--num-blocks", "2", *AUTO))
        assert sorted(ready_span(s) for s in servers) == [(0, 2), (2, 4), (4, 6)]
        extra = launcher.start_server_in_process(path, None, [servers[0].maddr], "--num-blocks", "2", *AUTO)
        reader = DhtReader([servers[0].maddr])
        try:
            leaving = next(s for s in servers if ready_span(s) != ready_span(extra))
            lost = ready_span(leaving)
            leaving.stop()  # SIGTERM: announces offline
            started = time.monotonic()
            spans = reader.wait_for(lambda spans: not uncovered(spans, 6), "tiny-llama", 6, timeout=60)
            assert not uncovered(spans, 6), f"blocks {sorted(uncovered(spans, 6))} stayed uncovered: {spans}"
            recovery = time.monotonic() - started
            # re-covered by one that was serving other blocks (no server joined): it moved there
            movers = [s for s in servers + [extra] if s is not leaving and ready_span(s) == lost]
            assert movers and all(spans[s.peer_id] == lost for s in movers), spans
            print(f"blocks {lost[0]}:{lost[1]} re-covered {recovery:.1f} s after their server left")
        finally:
            reader.close()


def test_a_move_keeps_open_sessions_on_the_old_blocks(tiny_model, tmp_path):
    path = tiny_model("llama")
    with LocalSwarm(tmp_path) as launcher:
        fixed_first = launcher.start_server_in_process(path, "0:3", [])
        fixed_last = launcher.start_server_in_process(path, "3:6", [fixed_first.maddr])
        mover = launcher.start_server_in_process(path, None, [fixed_first.maddr], "--num-blocks", "3", *AUTO)
        assert ready_span(mover) == (0, 3)  # ties go to the lowest start
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=[fixed_first.maddr], compression="none",
            routing_policy=RoutingPolicy(blocked_servers=[fixed_first.peer_id]))
        reader = DhtReader([fixed_first.maddr])
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        greedy = dict(do_sample=False, eos_token_id=None)
        try:
            ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
            with model.inference_session(max_length=40) as session:
                partial = model.generate(ids, max_new_tokens=6, **greedy)
                assert [hop.peer_id for hop in session.chain] == [mover.peer_id, fixed_last.peer_id]
                fixed_last.terminate()  # as SIGTERM does: blocks 3:6 lose their only server
                spans = reader.wait_for(lambda spans: spans.get(mover.peer_id) == (3, 6), "tiny-llama", 6, 60)
                assert spans.get(mover.peer_id) == (3, 6), spans
                # The session's first hop still runs on the mover's old blocks 0:3; its second is replayed on the
                # mover's new blocks 3:6.
                full = model.generate(partial, max_new_tokens=6, **greedy)
                assert [hop.peer_id for hop in session.chain] == [mover.peer_id, mover.peer_id]
            assert torch.equal(full, local.generate(ids, max_new_tokens=12, **greedy))
            assert ready_span(mover) == (3, 6)
        finally:
            reader.close()
            model.shutdown()


