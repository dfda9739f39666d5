"""The examples run against a real swarm and do what they say: the LLM ones against the embedded SmolLM2 model's
servers, the video ones against the two servers they start for a tiny pipeline they write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.utils import preloaded

pytestmark = pytest.mark.slow(seconds=85)
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def peers(launcher, embedded_model):
    first = launcher.start_server_in_process(None, "0:15", [])
    launcher.start_server_in_process(None, "15:30", [first.maddr])
    return [first.maddr]


def run_example(name: str, *args: str) -> str:
    """``python examples/NAME ARGS``, forked from the pre-imported zygote (swarm/utils/preloaded.py): the script
    runs as it would from a shell, and the swarm it starts is forked by the same zygote."""
    result = preloaded.run([str(EXAMPLES / name), *args], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_prompt_tuning_loss_goes_down(peers):
    output = run_example("prompt_tuning.py", "--initial-peers", *peers, "--steps", "6")
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", output)]
    assert len(losses) == 6
    assert losses[-1] < losses[0] * 0.9, losses


def test_chat_keeps_one_session_across_turns(peers):
    output = run_example("chat.py", "--initial-peers", *peers, "--max-new-tokens", "24", "--prompts",
                         "What is the capital of France?", "Repeat the name of that city.")
    assert "Paris" in output
    turns = [(int(sent), int(cached)) for sent, cached in
             re.findall(r"\[turn: (\d+) positions sent, (\d+) positions cached", output)]
    assert len(turns) == 2
    (first_sent, first_cached), (second_sent, second_cached) = turns
    assert first_sent == first_cached  # the first turn computes everything once
    # The second turn sends only its own positions: the first turn's prompt and answer stay on the servers.
    assert second_sent == second_cached - first_cached


@pytest.mark.parametrize("name, shape", [("video_interpolation.py", "(1, 4, 64, 64, 3)"),
                                         ("video_latent_shift.py", "(1, 4, 64, 64, 3)"),
                                         ("video_consisti2v.py", "(1, 4, 3, 64, 64)"),
                                         ("video_editing.py", "(1, 4, 3, 64, 64)")])
def test_video_examples_equal_their_local_run(name, shape):
    """Stand-alone (tiny random pipelines, servers of their own), with the default sizes: a 4-frame 64 px video
    through the swarm (numpy frames, or torch ones for the image-conditioned workloads), equal to the local run."""
    output = run_example(name)
    assert f"\noutput shape: {shape}\n" in output, output
    difference = re.search(r"^max difference from the local run: (\S+)$", output, re.MULTILINE)
    assert difference and float(difference.group(1)) == 0, output


def test_lora_example_equals_its_local_run():
    """Stand-alone: a tiny SD pipeline and a LoRA with a text-encoder part, served by two servers of its own
    (``--adapters``) and loaded by the client with ``load_lora_weights``; equal to the local pipeline's image."""
    output = run_example("lora_diffusion.py")
    assert "Adapters served for this U-Net: ['style']" in output, output
    difference = re.search(r"^max difference from the local run: (\S+)$", output, re.MULTILINE)
    assert difference and float(difference.group(1)) == 0, output
    change = re.search(r"^max change the LoRA makes: (\S+)$", output, re.MULTILINE)
    assert change and float(change.group(1)) > 1e-3, output  # the LoRA is in use


def test_training_through_a_served_unet_lowers_the_loss():
    """Stand-alone: a tiny random SD pipeline and two servers of its own; the client's conditioning adapter learns
    through both servers' backward steps, with the RegMixup term."""
    output = run_example("train_unet_regmixup.py", "--steps", "8")
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", output)]
    assert len(losses) == 8
    assert losses[-1] < losses[0] * 0.9, losses
    assert "(down)" in output
