"""LoRA adapters served beside the base blocks (``--adapters``): a client choosing one gets the local peft model's
output, exactly (float32, ``compression="none"``), in forward, backward and generation; routing uses only servers
holding it; records and the health page list adapters; adapters that cannot be served are refused at load."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm import AutoDistributedModelForCausalLM
from swarm.blocks.adapters import AdapterError
from swarm.blocks.span import BlockSpan
from swarm.client.routing import MissingBlocksError
from swarm.compression import serialize_tensor
from swarm.dht.schema import ModelInfo
from swarm.health.page import _server_row
from swarm.health.state import model_status
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, call
from swarm.rpc.messages import span_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base_path, directory, seed: int, **options) -> object:
    """A random (non-zero) LoRA of the whole model saved by peft; returns the local peft model."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=options.pop("target_modules", TARGETS),
                        init_lora_weights=False, **options)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def served(launcher, tiny_model, tmp_path_factory):
    """tiny-llama on two servers with adapters alpha and beta (0:3, 3:6), and one with the base model alone (0:6)."""
    path = tiny_model("llama")
    root = tmp_path_factory.mktemp("adapters")
    local = {name: save_adapter(path, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}
    adapters = ["--adapters", f"alpha={root / 'alpha'}", f"beta={root / 'beta'}"]
    first = launcher.start_server_in_process(path, "0:3", [], *adapters)
    second = launcher.start_server_in_process(path, "3:6", [first.maddr], *adapters)
    plain = launcher.start_server_in_process(path, "0:6", [first.maddr])
    return {"path": path, "peers": [first.maddr], "local": local, "base": AutoModelForCausalLM.from_pretrained(path),
            "with_adapters": {first.peer_id, second.peer_id}, "plain": plain.peer_id}


@pytest.fixture(scope="module")
def model(served):
    model = AutoDistributedModelForCausalLM.from_pretrained(served["path"], initial_peers=served["peers"],
                                                            model_id="tiny-llama", compression="none",
                                                            active_adapter="alpha", verify_probability=0.0)
    yield model
    model.shutdown()


def ids(seed: int = 0, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def test_each_adapter_equals_its_local_peft_model(served, model):
    alpha, beta = served["local"]["alpha"], served["local"]["beta"]
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, alpha(input_ids=tokens).logits)  # from_pretrained's active_adapter
        with model.use_adapter("beta"):
            assert torch.equal(model(tokens).logits, beta(input_ids=tokens).logits)
        with model.use_adapter(None):  # the base model
            assert torch.equal(model(tokens).logits, served["base"](tokens).logits)
        assert not torch.equal(alpha(input_ids=tokens).logits, served["base"](tokens).logits)  # adapters do change it
    # only servers holding the adapter are chosen for it
    assert {span.peer_id for span in model.route()} <= served["with_adapters"]


def test_generation_and_backward_run_with_the_adapter(served, model):
    alpha, beta = served["local"]["alpha"], served["local"]["beta"]
    prompt = ids(1, 5)[:1]
    expected = alpha.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), expected)
    expected_beta = beta.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, active_adapter="beta"),
                       expected_beta)
    assert not torch.equal(expected, expected_beta)
    # a session opened under one adapter refuses another one's generate
    with model.inference_session(max_length=32) as session, pytest.raises(ValueError, match="runs with adapter"):
        model.generate(prompt, session=session, max_new_tokens=2, active_adapter="beta")

    # gradients through the servers' backward include the adapter's matrices
    tokens = ids(2)
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=tokens).loss.backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    alpha(inputs_embeds=local_embeds, labels=tokens).loss.backward()
    assert torch.allclose(embeds.grad, local_embeds.grad, atol=1e-6), (embeds.grad - local_embeds.grad).abs().max()


def test_threads_with_different_adapters_decode_at_once(served, model):
    """Sessions of two adapters decoding together on one server: each gets its own adapter's tokens (decode steps
    of different adapters are never merged into one batch)."""
    prompt = ids(3, 4)[:1]
    expected = {name: local.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
                for name, local in served["local"].items()}
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            with model.use_adapter(name):
                results[name] = model.generate(prompt, max_new_tokens=12, do_sample=False)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for name, tokens in expected.items():
        assert torch.equal(results[name], tokens), name


def test_records_and_the_health_page_list_adapters_and_unknown_ones_are_refused(served, model):
    manager = model.get_remote().manager
    manager.loop.run(manager.update(force=True))
    for peer in served["with_adapters"]:
        assert manager.servers[peer].adapters == ("alpha", "beta")
    assert manager.servers[served["plain"]].adapters == ()
    status = model_status("tiny-llama", ModelInfo(6), manager.servers, {})
    rows = {server.peer_id: server for server in status.servers}
    assert rows[served["plain"]].adapters == [] and "<td class='adapters'>alpha, beta</td>" in _server_row(
        rows[min(served["with_adapters"])], 6)

    with model.use_adapter("nope"), pytest.raises(MissingBlocksError, match="does not serve adapter 'nope'"):
        model(ids())
    # a server asked directly for an adapter it lacks says so
    peer = served["plain"]
    message = span_inputs(0, 6, serialize_tensor(torch.zeros(1, 2, 64), "none"), torch.arange(2)[None], None,
                          "none", active_adapter="alpha")
    with pytest.raises(RemoteError, match="does not serve adapter 'alpha'"):
        manager.loop.run(call(manager.p2p, peer, protocol.FORWARD, message, timeout=30))


def test_adapters_that_cannot_be_served_are_refused_at_load(tiny_model, tmp_path):
    path = tiny_model("llama")
    save_adapter(path, tmp_path / "head", 3, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="decoder layers only"):
        BlockSpan.from_pretrained(path, 0, 3, adapters=[str(tmp_path / "head")])
    save_adapter(path, tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        BlockSpan.from_pretrained(path, 0, 3, adapters=[str(tmp_path / "dora")])
    # an adapter of another model: its matrices do not fit these layers
    other = tmp_path / "other-model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 vocab_size=VOCAB)).save_pretrained(other)
    save_adapter(other, tmp_path / "foreign", 5)
    with pytest.raises(AdapterError, match="is it an adapter of this model"):
        BlockSpan.from_pretrained(path, 0, 3, adapters=[str(tmp_path / "foreign")])
    # a directory is named after itself, and only the span's own layers are adapted
    save_adapter(path, tmp_path / "plain-lora", 6)
    span = BlockSpan.from_pretrained(path, 3, 5, adapters=[str(tmp_path / "plain-lora")])
    assert span.adapters.names == ["plain-lora"] and len(span.adapters.hooks) == 2 * len(TARGETS)
