"""Task heads on remote blocks: a sequence classifier (local embeddings, norm and ``score``; blocks on servers)
equal to transformers' own, trainable through the servers' backward."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForSequenceClassification

from swarm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification


@pytest.fixture(scope="module")
def served(launcher, tiny_model, tmp_path_factory):
    """tiny-llama's blocks on two servers, and a classifier checkpoint with those blocks and a 3-class head."""
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:3", [])
    launcher.start_server_in_process(path, "3:6", [first.maddr])
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, pad_token_id=0).eval()
    saved = tmp_path_factory.mktemp("classifier") / "tiny-llama-classifier"
    classifier.save_pretrained(saved)
    return {"path": path, "classifier": saved, "peers": [first.maddr], "local": classifier}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second padded on the right (pad id 0), as a tokenizer pads for classification."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return ids, mask


def train(model, optimizer: torch.optim.Optimizer, steps: int, **batch) -> list[float]:
    """``steps`` optimizer steps on one batch through the servers' forward and backward; the loss of each."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_sequence_classifier_equals_local_and_trains_its_head(served):
    local = served["local"]
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        served["classifier"], initial_peers=served["peers"], model_id="tiny-llama", compression="none")
    try:
        assert model.config.num_labels == 3 and torch.equal(model.score.weight, local.score.weight)
        ids, mask = batch()
        labels = torch.tensor([2, 0])
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ref = local(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.equal(out.logits, ref.logits), (out.logits, ref.logits)  # exact, as compression="none" promises
        assert torch.allclose(out.loss, ref.loss, atol=1e-5)
        # the padded row is classified by its last real token, so padding does not change it
        alone = model(input_ids=ids[1:, :4]).logits
        assert torch.allclose(alone, out.logits[1:], atol=1e-5)
        # gradients reach the client's head through the servers' backward, equal to local ones
        out.loss.backward()
        ref.loss.backward()
        assert torch.allclose(model.score.weight.grad, local.score.weight.grad, atol=1e-5)
        assert model.model.embed_tokens.weight.grad is not None  # and the embeddings, below the remote blocks
        losses = train(model, torch.optim.SGD(model.score.parameters(), lr=0.5), 5, input_ids=ids,
                       attention_mask=mask, labels=labels)
        assert losses[-1] < losses[0] * 0.8, losses
    finally:
        model.shutdown()


def test_a_causal_checkpoint_gets_a_new_head_of_the_classes_asked_for(served, caplog):
    with caplog.at_level(logging.WARNING):
        model = AutoDistributedModelForSequenceClassification.from_pretrained(
            served["path"], initial_peers=served["peers"], num_labels=4, compression="none")
    try:
        assert "'score' is newly initialized" in caplog.text
        ids, _ = batch()
        with torch.no_grad():
            assert model(input_ids=ids[:1]).logits.shape == (1, 4)
    finally:
        model.shutdown()


# ---- prompt tuning (Petals' tuning_mode="ptune" / "deep_ptune")


def _local_with_prompts(local, ids: torch.Tensor, prompt: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """transformers' model with the prompt prepended and ``deep[i]`` added to its positions before layer i (hooks):
    the reference, computed without any of swarm's code."""
    pre = prompt.shape[0]

    def adder(index: int):
        def hook(module, args, kwargs):
            key = "hidden_states" if "hidden_states" in kwargs else None
            hidden = kwargs[key] if key else args[0]
            hidden = torch.cat([hidden[:, :pre] + deep[index], hidden[:, pre:]], dim=1)
            if key:
                return args, {**kwargs, key: hidden}
            return (hidden, *args[1:]), kwargs
        return hook

    handles = [layer.register_forward_pre_hook(adder(i), with_kwargs=True)
               for i, layer in enumerate(local.model.layers)]
    try:
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), local.model.embed_tokens(ids)], dim=1)
        return local(inputs_embeds=embeds).logits[:, pre:]
    finally:
        for handle in handles:
            handle.remove()


def test_deep_prompts_equal_a_local_reference_and_their_gradients_come_back(served):
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(served["path"], initial_peers=served["peers"],
                                                            tuning_mode="deep_ptune", pre_seq_len=3,
                                                            compression="none")
    local = AutoModelForCausalLM.from_pretrained(served["path"]).eval()
    try:
        inner = model.model
        assert not torch.count_nonzero(inner.intermediate_prompt_embeddings.weight)  # starts as plain ptune
        with torch.no_grad():
            inner.intermediate_prompt_embeddings.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
        logits = model(input_ids=ids).logits
        prompt = inner.prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = inner._deep_prompts().squeeze(1).detach().clone().requires_grad_(True)  # (blocks, pre, hidden)
        reference = _local_with_prompts(local, ids, prompt, deep)
        assert logits.shape == (2, 5, VOCAB)
        assert torch.allclose(logits, reference, atol=1e-5), (logits - reference).abs().max()
        # the same loss backpropagated on both sides: equal gradients for the shallow and the deep prompts
        target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
        (logits * target).sum().backward()
        (reference * target).sum().backward()
        assert torch.allclose(inner.prompt_embeddings.weight.grad, prompt.grad, atol=1e-4)
        deep_grad = inner.intermediate_prompt_embeddings.weight.grad.view(3, 6, -1).permute(1, 0, 2)
        assert torch.allclose(deep_grad, deep.grad, atol=1e-4), (deep_grad - deep.grad).abs().max()
        # and training only the prompts lowers a language-modelling loss through the servers
        for param in model.parameters():
            param.requires_grad_(False)
        trained = [inner.prompt_embeddings.weight, inner.intermediate_prompt_embeddings.weight]
        for param in trained:
            param.requires_grad_(True)
        losses = train(model, torch.optim.Adam(trained, lr=0.05), 6, input_ids=ids, labels=ids)
        assert losses[-1] < losses[0] - 0.1, losses

        # generation with the trained prompts: in a session, the prompt and its deep prompts go with the first step
        prompt, deep = inner.prompt_embeddings.weight.detach(), inner._deep_prompts().squeeze(1).detach()
        expected = ids[:1]
        with torch.no_grad():
            for _ in range(6):  # greedy, recomputing everything locally at each token
                step = _local_with_prompts(local, expected, prompt, deep)[:, -1].argmax(-1, keepdim=True)
                expected = torch.cat([expected, step], dim=1)
            assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), expected)
            # a session goes on after the prompt and the tokens it holds (Petals' generate(None))
            with model.inference_session(max_length=11) as session:
                model.generate(ids[:1], max_new_tokens=3, do_sample=False, session=session)
                more = model.generate(None, max_new_tokens=3, do_sample=False, session=session)
                assert session.position == 3 + 10  # the prompt's positions, then the tokens fed
            assert torch.equal(more, expected)
            # speculation rewinds the session within the tokens, never into the prompt
            assert torch.equal(model.generate(ids[:1], max_new_tokens=6, prompt_lookup_num_tokens=3), expected)
    finally:
        model.shutdown()


def test_a_classifier_trains_with_deep_prompts(served):
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        served["classifier"], initial_peers=served["peers"], model_id="tiny-llama", compression="none",
        tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        ids, mask = batch()
        labels = torch.tensor([1, 2])
        trained = [model.model.prompt_embeddings.weight, model.model.intermediate_prompt_embeddings.weight]
        losses = train(model, torch.optim.Adam(trained, lr=0.05), 6, input_ids=ids, attention_mask=mask,
                       labels=labels)
        assert losses[-1] < losses[0], losses
        assert model.model.intermediate_prompt_embeddings.weight.grad.abs().sum() > 0
    finally:
        model.shutdown()


def test_a_prompted_session_fails_over_with_its_deep_prompts(served, launcher):
    """The replacement server of a prompt-tuned session gets the history replayed with the deep prompts, so the
    tokens after a failover are those of the unbroken generation."""
    servers = [launcher.start_server_in_process(served["path"], "0:6", served["peers"], "--model-id", "tiny-replay")
               for _ in range(2)]
    model = AutoDistributedModelForCausalLM.from_pretrained(served["path"], initial_peers=served["peers"],
                                                            model_id="tiny-replay", tuning_mode="deep_ptune",
                                                            pre_seq_len=2, compression="none")
    try:
        with torch.no_grad():
            model.model.intermediate_prompt_embeddings.weight.normal_(0, 0.5,
                                                                      generator=torch.Generator().manual_seed(6))
            ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
            expected = model.generate(ids, max_new_tokens=8, do_sample=False)
            with model.inference_session(max_length=12) as session:
                first = model.generate(ids, max_new_tokens=4, do_sample=False, session=session)
                serving = session.chain[0].peer_id
                next(server for server in servers if server.peer_id == serving).stop()
                rest = model.generate(None, max_new_tokens=4, do_sample=False, session=session)
                assert session.chain[0].peer_id != serving  # it went on elsewhere, after a replay
        assert torch.equal(first, expected[:, :8]) and torch.equal(rest, expected), (rest, expected)
    finally:
        model.shutdown()
