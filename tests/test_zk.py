"""Zero-knowledge proofs of a block's output (swarm/trust/zk.py, ezkl): an honest proof verifies; a reply that
differs from the proven output, a proof for another input, a malformed one, and one made with other weights (another
verifying key) are refused with a clear error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ezkl", reason="the zk extra (ezkl, onnx) is part of the dev install")

from swarm.trust.zk import MAX_PROOF_BYTES, Circuit, ProofError  # noqa: E402

SHAPE = (1, 2, 8)  # batch, positions, width: a circuit small enough to prove in seconds
TOLERANCE = 0.01  # max abs gap between a float reply and the circuit's fixed-point output (scale 2^-13 per step)


def block(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()


@pytest.fixture(scope="module")
def circuits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zk")
    honest = block(0)
    samples = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    edited = block(0)
    with torch.no_grad():
        edited[0].weight[0, 0] += 0.25  # a server that changed one weight
    return {"honest": honest, "circuit": Circuit.make(honest, SHAPE, directory, samples),
            "edited": Circuit.make(edited, SHAPE, directory, samples)}


@pytest.fixture(scope="module")
def proven(circuits):
    inputs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    proof, output = circuits["circuit"].prove(inputs)
    return inputs, proof, output


def test_an_honest_proof_verifies_and_matches_the_float_output(circuits, proven):
    inputs, proof, output = proven
    reply = circuits["honest"](inputs).detach()
    assert (output - reply.flatten()).abs().max() < TOLERANCE
    circuits["circuit"].check(proof, inputs, reply, TOLERANCE)  # raises if not
    assert len(proof) < 200_000 and circuits["circuit"].stats().verifying_key_bytes > 0


def test_a_perturbed_reply_or_another_input_is_caught(circuits, proven):
    inputs, proof, _ = proven
    reply = circuits["honest"](inputs).detach()
    with pytest.raises(ProofError, match="differs from the proven output"):
        circuits["circuit"].check(proof, inputs, reply + 0.05 * reply.norm() / reply.numel() ** 0.5, TOLERANCE)
    with pytest.raises(ProofError, match="for another input"):
        circuits["circuit"].check(proof, inputs + 0.1, reply, TOLERANCE)


def test_a_proof_made_with_other_weights_does_not_verify(circuits, proven):
    inputs, _, _ = proven
    proof, output = circuits["edited"].prove(inputs)
    # its own claims are consistent, and the reply matches what it proved: only the verifying key tells
    circuits["edited"].check(proof, inputs, output.reshape(SHAPE), TOLERANCE)
    with pytest.raises(ProofError, match="does not verify"):
        circuits["circuit"].check(proof, inputs, output.reshape(SHAPE), TOLERANCE)


@pytest.mark.parametrize("mangle", ["truncated", "not json", "no instances", "oversized", "flipped byte"])
def test_malformed_proofs_are_refused_clearly(circuits, proven, mangle):
    inputs, proof, output = proven
    bad = {"truncated": proof[: len(proof) // 2], "not json": b"\x00\xff" * 10,
           "no instances": b'{"proof": "00"}', "oversized": b" " * (MAX_PROOF_BYTES + 1),
           "flipped byte": _flip_proof_byte(proof)}[mangle]
    with pytest.raises(ProofError):
        circuits["circuit"].check(bad, inputs, output.reshape(SHAPE), TOLERANCE)
    circuits["circuit"].check(proof, inputs, output.reshape(SHAPE), TOLERANCE)  # and the real one still verifies


def _flip_proof_byte(proof: bytes) -> bytes:
    """The proof's own bytes changed in one hex digit (instances untouched)."""
    import json

    document = json.loads(proof)
    body = document["proof"]
    if isinstance(body, str):
        position = len(body) // 2
        document["proof"] = body[:position] + ("1" if body[position] != "1" else "2") + body[position + 1:]
    else:
        body[len(body) // 2] ^= 1
    return json.dumps(document).encode()
