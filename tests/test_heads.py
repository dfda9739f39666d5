"""Task heads on remote blocks: a sequence classifier (local embeddings, norm and ``score``; blocks on servers)
equal to transformers' own, trainable through the servers' backward."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForSequenceClassification

from swarm import AutoDistributedModelForSequenceClassification


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
        optimizer = torch.optim.SGD(model.score.parameters(), lr=0.5)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
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
