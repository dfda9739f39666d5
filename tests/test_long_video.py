"""Long video (TATS-style): the token layout, the transformer's training, and generation past the training length
with a sliding window, locally and through real servers (equal to local, and a server killed mid-clip replaced with
the same output)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.local_swarm import LocalSwarm
from swarm.utils import preloaded
from swarm.video.long_generation import generate_long_video, sample_code
from swarm.video.mugen import VOCABULARY, MugenLikeClips
from swarm.video.recipe import train_long_video_models
from swarm.video.transformer import TokenLayout, train_transformer, transformer_config
from swarm.video.vqvae import VQVAE3D, VQConfig

# 4 frames of 2x3 codes: a window of 24 tokens after a prefix of 8 words (+ BOS, BOV)
LAYOUT = TokenLayout(text_vocab=len(VOCABULARY), codebook=16, text_length=8, frame_height=2, frame_width=3,
                     frames=4)
TEXT = [0, 3, 5, 1]
EXAMPLE = Path(__file__).parent.parent / "examples" / "long_video.py"


def random_transformer(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(transformer_config(LAYOUT, hidden=32, layers=layers, heads=2)).eval()


def test_layout_places_text_and_codes_and_travels_in_the_config(tmp_path):
    codes = torch.randint(LAYOUT.codebook, (LAYOUT.frames, 2, 3))
    sequence = LAYOUT.sequence(TEXT, codes)
    assert sequence.shape == (LAYOUT.sequence_length,) and LAYOUT.sequence_length == 10 + 24
    assert sequence[0] == 1 and sequence[LAYOUT.prefix_length - 1] == 2  # BOS ... BOV
    assert sequence[1:5].tolist() == [t + LAYOUT.text_offset for t in TEXT] and sequence[5:9].tolist() == [0] * 4
    assert torch.equal(LAYOUT.codes(sequence[LAYOUT.prefix_length:]), codes)
    with pytest.raises(ValueError, match="at most 8 words"):
        LAYOUT.prefix(list(range(9)))
    with pytest.raises(ValueError, match="word indices"):
        LAYOUT.prefix([len(VOCABULARY)])
    with pytest.raises(ValueError, match="whole frames"):
        LAYOUT.codes(sequence[LAYOUT.prefix_length:-1])
    random_transformer().save_pretrained(tmp_path)
    assert TokenLayout.of(AutoModelForCausalLM.from_pretrained(tmp_path).config) == LAYOUT


def test_the_transformer_learns_tokenized_clips():
    """Clips -> a (tiny, untrained) VQ's codes -> sequences -> a few training steps: the loss drops, and the model
    generates whole frames of codes for a description."""
    clips = MugenLikeClips(8, frames=8, size=16, seed=1)
    torch.manual_seed(0)
    vq = VQVAE3D(VQConfig(hidden=16, codebook_size=16, code_dim=8)).eval()
    with torch.no_grad():
        codes = vq.encode(torch.stack([clips[i]["video"] for i in range(len(clips))]))
    frames, height, width = codes.shape[1:]
    layout = TokenLayout(len(VOCABULARY), 16, 24, height, width, frames)
    sequences = torch.stack([layout.sequence(clips[i]["text_ids"], codes[i]) for i in range(len(clips))])
    model, stats = train_transformer(sequences, layout, hidden=32, layers=2, heads=2, steps=40, batch_size=4,
                                     lr=1e-2)
    assert stats["loss_last"] < 0.7 * stats["loss_first"], stats
    clip = generate_long_video(model, clips[0]["text_ids"], frames, seed=0)
    assert clip.codes.shape == (frames, height, width) and clip.slides == 0


def _naive_long_video(model, frames: int, stride: int, seed: int) -> torch.Tensor:
    """The sliding window without any cache: each token from a full forward over [prefix, window so far]."""
    per_frame, prefix = LAYOUT.tokens_per_frame, LAYOUT.prefix(TEXT)
    generator, video, first = torch.Generator().manual_seed(seed), [], 0
    with torch.no_grad():
        while len(video) < frames * per_frame:
            if len(video) == (first + LAYOUT.frames) * per_frame:
                first += stride
            context = torch.cat([prefix, torch.tensor(video[first * per_frame:], dtype=torch.long)])[None]
            video.append(sample_code(model(input_ids=context).logits[:, -1], LAYOUT, generator, 16, 1.0))
    return LAYOUT.codes(torch.tensor(video))


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_the_sliding_window_equals_recomputing_each_window(stride):
    """Cache cut back to the prefix and the window re-sent on each slide: the same tokens as recomputing the window
    for every token, with the cost the module states."""
    model = random_transformer()
    clip = generate_long_video(model, TEXT, 10, stride=stride, seed=3)
    assert torch.equal(clip.codes, _naive_long_video(model, 10, stride, seed=3))
    slides = -(-(10 - LAYOUT.frames) // stride)
    assert clip.slides == slides and clip.tokens_generated == 60
    assert clip.tokens_resent == slides * (LAYOUT.frames - stride) * LAYOUT.tokens_per_frame
    # every token is fed once, except the last one; the prefix once; the windows again
    assert clip.tokens_sent == LAYOUT.prefix_length + 60 - 1 - slides + clip.tokens_resent
    with pytest.raises(ValueError, match="stride must lie"):
        generate_long_video(model, TEXT, 10, stride=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The training recipe at tiny sizes (a few seconds): DIR/vq, DIR/transformer, DIR/stats.json."""
    directory = tmp_path_factory.mktemp("video-models")
    stats = train_long_video_models(directory, clips=16, frames=8, size=16, vq_steps=10, steps=10, hidden=32,
                                    layers=4, heads=2, vq_config=VQConfig(hidden=16, codebook_size=16, code_dim=8))
    assert stats["layout"]["frames"] == 4 and stats["layout"]["frame_height"] == 4  # 8 frames -> 4 of 4x4 codes
    return directory


@pytest.fixture(scope="module")
def video_swarm(trained, tmp_path_factory):
    path = trained / "transformer"
    with LocalSwarm(tmp_path_factory.mktemp("video-swarm")) as launcher:
        first = launcher.start_server(path, "0:2", [])
        # routing prefers the fast replica of blocks 2:4, so the test knows which one a session uses
        fast = launcher.start_server(path, "2:4", [first.maddr], "--throughput", "1000", wait=False)
        spare = launcher.start_server(path, "2:4", [first.maddr], "--throughput", "1", wait=False)
        fast.wait_ready(), spare.wait_ready()
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr],
                                                                compression="none")
        yield {"model": model, "local": AutoModelForCausalLM.from_pretrained(path).eval(), "fast": fast,
               "spare": spare, "peers": [first.maddr], "layout": TokenLayout.of(model.config)}
        model.shutdown()


def test_a_clip_four_times_the_training_length_through_the_swarm_equals_local(video_swarm):
    layout = video_swarm["layout"]
    frames = 4 * layout.frames
    local = generate_long_video(video_swarm["local"], TEXT, frames, seed=7)
    remote = generate_long_video(video_swarm["model"], TEXT, frames, seed=7)
    assert remote.codes.shape == (frames, 4, 4)
    assert torch.equal(remote.codes, local.codes)
    # the servers' sessions never held more than one window: each slide rewound them to the prefix
    assert remote.slides == 6 and remote.tokens_sent == local.tokens_sent
    assert remote.tokens_resent == 6 * 2 * layout.tokens_per_frame


def test_the_example_writes_a_clip_equal_to_local_with_its_figures(video_swarm, trained, tmp_path):
    gif = tmp_path / "clip.gif"
    result = preloaded.run([str(EXAMPLE), "--models", str(trained), "--initial-peers", *video_swarm["peers"],
                            "--length", "2", "--classifier-steps", "5", "--out", str(gif), "--strip",
                            str(tmp_path / "strip.png")], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)
    assert figures["equal_to_local"] == "True" and figures["slides"] == "2", result.stdout
    # (window - stride) / stride frames of 16 codes re-sent per new frame
    assert float(figures["tokens_resent_per_new_frame"]) == 16 and float(figures["swarm_vs_local"]) > 0
    assert 0 <= float(figures["generated_windows_in_order"]) <= 1
    assert f"Wrote {gif} (16 frames of 16x16)" in result.stdout  # 2 x 4 frames of codes, each 2 frames of video
    from PIL import Image

    with Image.open(gif) as image:
        assert image.size == (64, 64)  # (scaled 4x)


def test_a_server_killed_mid_clip_is_replaced_with_the_same_output(video_swarm):
    model, fast, spare = video_swarm["model"], video_swarm["fast"], video_swarm["spare"]
    frames = 4 * video_swarm["layout"].frames
    used = []

    def kill_at_frame(frame: int) -> None:
        used.append(model.get_remote().active_session.hops[-1].span.peer_id)
        if frame == 6:  # after two slides, in the middle of the clip
            fast.signal(signal.SIGKILL)

    local = generate_long_video(video_swarm["local"], TEXT, frames, seed=11)
    remote = generate_long_video(model, TEXT, frames, seed=11, on_frame=kill_at_frame)
    assert torch.equal(remote.codes, local.codes)
    assert used[6] == fast.peer_id and used[-1] == spare.peer_id, used
