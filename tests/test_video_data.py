"""MUGEN-like clips (determinism, shapes, descriptions, audio, vocabulary) and the 3D VQ autoencoder (shapes, a tiny
training run, save/load). Tiny settings throughout: each test takes seconds."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.video.mugen import EVENTS, PALETTE, PITCH, VOCABULARY, MugenLikeClips, tokenize_text
from swarm.video.vqvae import VQVAE3D, VQConfig, frame_errors, load_vqvae, psnr, save_vqvae, train_vqvae

SKY = PALETTE[0]
TINY = VQConfig(hidden=16, code_dim=8, codebook_size=32, res_blocks=1)


def _assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["video"], b["video"])
    assert torch.equal(a["audio"], b["audio"])
    assert torch.equal(a["text_ids"], b["text_ids"])
    assert a["text"] == b["text"]
    assert a["events"] == b["events"]


def test_clips_are_deterministic_per_seed_and_index():
    forward = [MugenLikeClips(6, seed=3)[i] for i in range(6)]
    backward = [MugenLikeClips(6, seed=3)[i] for i in reversed(range(6))][::-1]  # reading order must not matter
    for a, b in zip(forward, backward, strict=True):
        _assert_same(a, b)
    assert not torch.equal(forward[0]["video"], forward[1]["video"])
    assert not torch.equal(MugenLikeClips(6, seed=4)[0]["video"], forward[0]["video"])
    assert len({item["text"] for item in MugenLikeClips(32, seed=3)}) > 8  # descriptions vary too


@pytest.mark.parametrize(("frames", "size"), [(16, 32), (32, 32), (16, 64), (32, 64)])
def test_clip_shapes_dtypes_and_ranges(frames, size):
    clips = MugenLikeClips(3, frames=frames, size=size)
    assert len(clips) == 3
    item = clips[2]
    video = item["video"]
    assert video.shape == (frames, 3, size, size) and video.dtype == torch.float32
    assert 0 <= video.min() and video.max() <= 1
    colours = video.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0)
    assert len(colours) <= len(PALETTE)  # flat colours only
    assert not torch.equal(video[0], video[-1])  # something moves
    assert item["audio"].shape == (8000 * frames // 8,) and item["audio"].dtype == torch.float32
    assert item["text_ids"].dtype == torch.long
    assert all(isinstance(f, int) and 0 < f < frames and name in EVENTS for f, name in item["events"])
    with pytest.raises(IndexError):
        clips[3]


def test_descriptions_and_pictures_follow_the_events():
    clips = MugenLikeClips(48, frames=16, size=32)
    ground_row = 24
    seen = set()
    for index in range(len(clips)):
        item = clips[index]
        words, names = item["text"].split(), {name for _, name in item["events"]}
        assert words[:2] == ["the", "character"]
        assert ("jump" in names) == ("jumps" in words)
        assert ("collect" in names) == bool({"coin", "coins"} & set(words))
        assert ("gap" in names) == bool({"gap", "gaps"} & set(words))
        video = item["video"]
        coin = (video == PALETTE[7][None, :, None, None]).all(dim=1).sum(dim=(1, 2))  # coin pixels per frame
        for frame, name in item["events"]:
            if name == "collect":  # the coin is gone from that frame on
                assert coin[frame] < coin[frame - 1]
            elif name == "gap":  # sky through the ground near the character
                assert (video[frame, :, ground_row + 2] == SKY[:, None]).all(dim=0)[8:24].any()
        seen |= names
    assert seen == set(EVENTS)


def test_audio_sounds_exactly_at_the_event_frames():
    rate, fps, frames = 8000, 8, 32
    clips = MugenLikeClips(12, frames=frames, fps=fps, audio_rate=rate)
    per_frame = rate // fps
    pitches = set()
    for index in range(len(clips)):
        item = clips[index]
        windows = item["audio"].reshape(frames, per_frame)
        loud = (windows.pow(2).sum(dim=1) > 1e-3).nonzero().flatten().tolist()
        assert loud == sorted(frame for frame, _ in item["events"])
        for frame, name in item["events"]:  # the tone's pitch tells the event
            spectrum = torch.fft.rfft(windows[frame]).abs()
            assert abs(spectrum.argmax().item() * rate / per_frame - PITCH[name]) <= rate / per_frame
            pitches.add(PITCH[name])
    assert len(pitches) == 3
    assert MugenLikeClips(1, frames=16, audio_rate=16000)[0]["audio"].shape == (32000,)


def test_tokenize_text_round_trips_and_rejects_unknown_words():
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    text = "the character runs left and jumps over two gaps then collects a coin then jumps three times"
    ids = tokenize_text(text)
    assert " ".join(VOCABULARY[i] for i in ids) == text
    for item in MugenLikeClips(24, frames=32):
        assert item["text_ids"].tolist() == tokenize_text(item["text"])
        assert " ".join(VOCABULARY[i] for i in item["text_ids"]) == item["text"]
    with pytest.raises(ValueError, match="flies"):
        tokenize_text("the character flies")


def test_psnr_and_frame_errors():
    video = torch.zeros(4, 3, 8, 8)
    assert psnr(video, video) == math.inf
    assert psnr(video, video + 0.1) == pytest.approx(20.0)
    broken = video.clone()
    broken[2] = 1.0
    errors = frame_errors(video, broken)
    assert errors.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert frame_errors(video[None].expand(3, -1, -1, -1, -1), broken[None].expand(3, -1, -1, -1, -1)).shape == (4,)


def test_vq_shapes_with_the_default_downsampling():
    config = VQConfig(hidden=16, code_dim=8, codebook_size=16, res_blocks=1)
    assert (config.time_down, config.space_down) == (VQConfig().time_down, VQConfig().space_down) == (2, 4)
    model = VQVAE3D(config).eval()
    video = torch.rand(2, 16, 3, 32, 32)
    codes = model.encode(video)
    assert codes.shape == (2, 8, 8, 8) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    decoded = model.decode(codes)
    assert decoded.shape == video.shape and 0 <= decoded.min() and decoded.max() <= 1
    reconstruction, loss, forward_codes = model(video)
    assert reconstruction.shape == video.shape and loss.dim() == 0
    assert torch.equal(forward_codes, codes)
    assert model.encode(torch.rand(1, 32, 3, 64, 64)).shape == (1, 16, 16, 16)
    with pytest.raises(ValueError):
        model.encode(torch.rand(1, 15, 3, 32, 32))


def test_tiny_training_lowers_the_loss_and_save_load_round_trips(tmp_path):
    clips = MugenLikeClips(20, frames=8, size=16)
    lines = []
    model, stats = train_vqvae(clips, TINY, steps=30, batch_size=4, lr=3e-3, seed=1, log=lines.append)
    losses = stats["losses"]
    assert len(losses) == stats["steps"] == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert math.isfinite(stats["psnr"]) and stats["psnr"] > 8
    assert 1 <= stats["codebook_used"] <= TINY.codebook_size
    # the held-out error per frame (8 frames) averages to the PSNR's error
    assert len(stats["frame_mse"]) == 8
    assert stats["psnr"] == pytest.approx(-10 * math.log10(sum(stats["frame_mse"]) / 8), rel=1e-4)
    assert stats["seconds"] > 0 and lines and not model.training

    video = torch.stack([clips[i]["video"] for i in range(2)])
    save_vqvae(model, tmp_path / "vq")
    loaded = load_vqvae(tmp_path / "vq")
    assert loaded.config == model.config and not loaded.training
    codes = model.encode(video)
    assert torch.equal(loaded.encode(video), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))

    again, _ = train_vqvae(clips, TINY, steps=30, batch_size=4, lr=3e-3, seed=1)  # deterministic for a seed
    assert torch.equal(again.encode(video), codes)
