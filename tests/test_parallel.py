"""A large forward/backward batch is split over two full replicas when routing finds it finishes sooner, and the
result still equals the local model."""

from __future__ import annotations

import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.rpc import protocol
from swarm.rpc.client import call


def test_batch_split_over_parallel_chains(launcher, tiny_model):
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:6", [], "--throughput", "50")  # slow: compute dominates the cost
    second = launcher.start_server_in_process(path, "0:6", [first.maddr], "--throughput", "50")
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
        embeddings = model.get_input_embeddings().weight.requires_grad_(True)
        out = model(ids, labels=ids)
        out.loss.backward()
        ref = local(ids, labels=ids)
        ref.loss.backward()
        assert torch.allclose(out.logits, ref.logits, atol=1e-4, rtol=0)
        assert torch.allclose(embeddings.grad, local.get_input_embeddings().weight.grad, atol=1e-4, rtol=0)
        manager = model.get_remote().manager
        served = [manager.loop.run(call(manager.p2p, s.peer_id, protocol.INFO, {}, timeout=10))["served"]
                  for s in (first, second)]
        assert all(s["forward"] >= 1 and s["backward"] >= 1 for s in served), served
    finally:
        model.shutdown()
