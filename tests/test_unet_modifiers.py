"""Per-session U-Net modifiers through real servers: named attention processors (first-frame attention) and
features captured in one evaluation and injected in a later one, equal to the same modifiers on the local U-Net;
what cannot be done is refused clearly and the servers go on serving."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from swarm import AutoDistributedPipeline
from swarm.blocks.unet_modifiers import (
    DefaultAttnProcessor,
    FirstFrameAttnProcessor,
    LocalFeatureBank,
    feature_places,
    first_frame_processors,
)
from swarm.compression import serialize_tensor
from swarm.hub.tiny_diffusion import save_tiny_sd, save_tiny_text_to_video
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream, call


@pytest.fixture(scope="module")
def sd(launcher, models_dir):
    path = save_tiny_sd(models_dir / "tiny-sd-modifiers")
    first, second = launcher.start_halves(path, in_process=True)  # levels 0:1 and 1:3
    local = DiffusionPipeline.from_pretrained(path)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"local": local, "remote": remote, "peers": [first.maddr, second.maddr]}
    remote.unet.shutdown()


@pytest.fixture(scope="module")
def video(launcher, models_dir):
    path = save_tiny_text_to_video(models_dir / "tiny-video-modifiers")
    first, _ = launcher.start_halves(path, in_process=True)
    local = DiffusionPipeline.from_pretrained(path)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"local": local, "remote": remote}
    remote.unet.shutdown()


def _inputs(unet, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), ehs


def _feature_bytes(remote, peers: list[str]) -> list[int]:
    manager = remote.unet.manager
    return [manager.loop.run(call(manager.p2p, maddr.rsplit("/p2p/", 1)[1], protocol.INFO, {}, timeout=10))["features"]
            for maddr in peers]


def _freed(remote, peers: list[str]) -> list[int]:
    """Feature bytes once the servers have seen their sessions close (a close is a message: it takes a moment)."""
    deadline = time.monotonic() + 10
    while any(held := _feature_bytes(remote, peers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


def test_default_processor_equals_diffusers_attention_exactly(sd):
    """``attend`` (the base of every named processor, where features are exchanged) computes what diffusers'
    own attention does, bit for bit, so a processor map that names the default changes nothing."""
    unet = sd["local"].unet
    args = _inputs(unet, 0)
    with torch.no_grad():
        expected = unet(*args, return_dict=False)[0]
        unet.set_attn_processor(DefaultAttnProcessor())
        try:
            assert torch.equal(unet(*args, return_dict=False)[0], expected)
        finally:
            unet.set_attn_processor(AttnProcessor2_0())


def test_first_frame_attention_through_the_swarm_equals_local(video):
    """ConsistI2V's first-frame attention set with diffusers' set_attn_processor on the remote U-Net runs on the
    servers for that session and equals the local U-Net with the same processors; the first frame (whose appended
    keys are its own) stays as plain attention computes it, the others change; the default processors restore the
    plain output."""
    local, remote = video["local"], video["remote"]
    frames = 3

    def generate(pipe) -> torch.Tensor:
        return pipe("a tiny test", num_inference_steps=2, height=64, width=64, num_frames=frames, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    plain = generate(local)
    remote.unet.set_attn_processor(first_frame_processors(remote.unet, frames))
    local.unet.set_attn_processor(first_frame_processors(local.unet, frames))
    try:
        chosen = remote.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
        assert isinstance(chosen, FirstFrameAttnProcessor)
        expected = generate(local)
        assert torch.equal(generate(remote), expected)
        assert not torch.allclose(expected, plain, atol=1e-3)
    finally:
        remote.unet.set_default_attn_processor()
        local.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(generate(remote), plain)


def test_first_frame_attention_keeps_the_first_frame(video):
    """In one spatial self-attention layer: the first frame attends to its own keys twice over, which weighs the
    same (unchanged up to rounding); the other frames now see the first frame's too."""
    unet = video["local"].unet
    attn = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    hidden = torch.randn(2 * 3, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden)
        first = FirstFrameAttnProcessor(3)(attn, hidden)
    for video_start in (0, 3):
        assert torch.allclose(first[video_start], plain[video_start], atol=1e-5)
        assert not torch.allclose(first[video_start + 1:video_start + 3], plain[video_start + 1:video_start + 3],
                                  atol=1e-3)
    with pytest.raises(ValueError, match="whole videos of 4 frames"):
        FirstFrameAttnProcessor(4)(attn, hidden)


def test_first_frame_temporal_attention_appends_the_first_frames_neighbourhood(video):
    """In one temporal self-attention layer (rows: the frames at one position of one video), the processor equals
    attention whose keys and values are extended by the first frame's 3x3 neighbourhood of that position (edges
    repeated), written out naively here."""
    from swarm.blocks.unet_modifiers import FirstFrameTemporalAttnProcessor, _state

    unet = video["local"].unet
    attn = unet.get_submodule("down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1")
    batch, height, width, frames = 2, 3, 4, 3
    hidden = torch.randn(batch * height * width, frames, attn.to_q.in_features,
                         generator=torch.Generator().manual_seed(2))
    _state.temporal_size = (height, width)  # what the hook on the temporal layer records
    try:
        with torch.no_grad():
            got = FirstFrameTemporalAttnProcessor(3)(attn, hidden)
    finally:
        _state.temporal_size = None
    with torch.no_grad():
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        grid = lambda x: x[:, 0].reshape(batch, height, width, -1)  # noqa: E731
        first_keys, first_values = grid(key), grid(value)
        rows = []
        for b in range(batch):
            for y in range(height):
                for x in range(width):
                    row = (b * height + y) * width + x
                    near = [(min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1))
                            for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                    keys = torch.cat([key[row], torch.stack([first_keys[b, i, j] for i, j in near])])
                    values = torch.cat([value[row], torch.stack([first_values[b, i, j] for i, j in near])])
                    heads = lambda t: t.view(t.shape[0], attn.heads, -1).transpose(0, 1)  # noqa: E731
                    out = torch.nn.functional.scaled_dot_product_attention(heads(query[row]), heads(keys),
                                                                           heads(values))
                    rows.append(out.transpose(0, 1).reshape(frames, -1))
        expected = attn.to_out[0](torch.stack(rows))
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="odd integer"):
        FirstFrameTemporalAttnProcessor(2)
    with pytest.raises(ValueError, match="hooked"):
        FirstFrameTemporalAttnProcessor(3)(attn, hidden)


def _places(unet) -> list[str]:
    """The up path's ResNet outputs and self-attention queries and keys (what PnP/AnyV2V inject)."""
    return [p for p in (unet.swarm_feature_places if hasattr(unet, "swarm_feature_places") else feature_places(unet))
            if p.startswith("up_blocks.")]


def test_injected_features_change_the_output_as_locally_and_close_frees_them(sd):
    """Features captured in one evaluation (kept on the servers that computed them) and injected at the same
    places in a later one, with another prompt and a batch of two (classifier-free guidance) where the capture had
    one row, give exactly the local result, which differs from the plain evaluation; server info shows the bytes
    held, and closing the bank frees them."""
    local, remote = sd["local"].unet, sd["remote"].unet
    source = tuple(x[:1] if x.dim() else x for x in _inputs(local, 0))
    target = _inputs(local, 5)
    places = _places(local)
    assert places == _places(remote) and any(p.endswith(".q") for p in places) and any("resnets" in p for p in places)

    with torch.no_grad():
        plain = local(*target, return_dict=False)[0]
        needed = local_bank_bytes(local, source, places)  # a server's session budget is small: ask for what it takes
        local_bank = LocalFeatureBank(local, needed)
        with local_bank.capture("t500", places):
            local(*source, return_dict=False)
        with local_bank.inject("t500", places):
            expected = local(*target, return_dict=False)[0]
        assert local_bank.bytes > 0
        local_bank.close()

        bank = remote.feature_bank(needed)
        try:
            with bank.capture("t500", places):
                remote(*source, return_dict=False)
            held = _feature_bytes(sd["remote"], sd["peers"])
            assert all(b > 0 for b in held) and sum(held) == needed
            with bank.inject("t500", places):
                injected = remote(*target, return_dict=False)[0]
        finally:
            bank.close()
    assert torch.equal(injected, expected)
    assert not torch.allclose(expected, plain, atol=1e-3)
    assert _freed(sd["remote"], sd["peers"]) == [0, 0]
    with torch.no_grad():  # the servers' attention is plain again
        assert torch.equal(remote(*target, return_dict=False)[0], plain)


def local_bank_bytes(unet, args: tuple, places: list[str]) -> int:
    bank = LocalFeatureBank(unet, 2**24)
    with torch.no_grad(), bank.capture("t", places):
        unet(*args, return_dict=False)
    return bank.bytes


def test_feature_and_processor_mistakes_get_clear_errors_and_servers_go_on(sd):
    """Unknown places and processors, injecting what was never captured, capturing beyond the session's bytes
    and injecting features of another shape: each a clear error for its caller; the next evaluation still equals
    the local U-Net."""
    local, remote = sd["local"].unet, sd["remote"].unet
    args = _inputs(local, 0)
    places = _places(local)
    with torch.no_grad():
        expected = local(*args, return_dict=False)[0]
        bank = remote.feature_bank(local_bank_bytes(local, args, places))
        try:
            with pytest.raises(ValueError, match="unknown feature places"), bank.capture("t", ["up_blocks.9.x"]):
                pass
            with pytest.raises(RemoteError, match="no features were captured at up_blocks"), bank.inject("t", places):
                remote(*args, return_dict=False)
            small = torch.randn(2, 4, 4, 4), *args[1:]
            with bank.capture("small", places):
                remote(*small, return_dict=False)
            with pytest.raises(RemoteError, match="have shape"), bank.inject("small", places):
                remote(*args, return_dict=False)
            assert torch.equal(remote(*args, return_dict=False)[0], expected)
        finally:
            bank.close()
        bank = remote.feature_bank(1000)
        try:
            with pytest.raises(RemoteError, match="may hold 1000"), bank.capture("t", places):
                remote(*args, return_dict=False)
        finally:
            bank.close()
        assert torch.equal(remote(*args, return_dict=False)[0], expected)
    assert _freed(sd["remote"], sd["peers"]) == [0, 0]

    manager = remote.manager
    peer = sd["peers"][0].rsplit("/p2p/", 1)[1]
    ehs = serialize_tensor(args[2])

    async def opens() -> None:
        for extra, error in [
            ({"processors": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": {"name": "evil"}}},
             "unknown attention processor"),
            ({"processors": {"nowhere": {"name": "default"}}}, "no attention layer is named 'nowhere'"),
            ({"processors": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1":
                             {"name": "first_frame", "num_frames": -1}}}, "num_frames must be"),
            ({"feature_bytes": -5}, "feature_bytes must be"),
        ]:
            stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
            try:
                with pytest.raises(RemoteError, match=error):
                    await stream.request({"type": "open", "start": 0, "end": 1, "output_codec": "none",
                                          "encoder_hidden_states": ehs, **extra}, 10)
            finally:
                stream.close()

    manager.loop.run(opens())


def test_consisti2v_through_the_swarm_equals_local(video):
    """ConsistI2V-style image-to-video (first-frame conditioning, first-frame attention on the servers, FrameInit)
    gives exactly the local algorithm's video; its first latent frame is the image's; the servers' sessions are
    closed and their attention is plain again afterwards."""
    from swarm.video.consisti2v import consisti2v, encode_image

    local, remote = video["local"], video["remote"]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def run(pipe, **options):
        return consisti2v(pipe, image, "a tiny test", num_frames=3, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0), **options)

    expected = run(local)
    out = run(remote)
    assert torch.equal(out.latents, expected.latents) and torch.equal(out.frames, expected.frames)
    assert out.frames.shape == (1, 3, 3, 64, 64)
    assert torch.equal(out.latents[:, :, 0], encode_image(local, image))
    assert remote.unet.session is None and remote.unet.processors == {}
    # the temporal layers' first-frame attention changes the video too
    assert not torch.allclose(run(remote, temporal_window=None).latents, expected.latents, atol=1e-4)
    # each part changes the video: without first-frame attention, without FrameInit
    assert not torch.allclose(run(remote, first_frame_attention=False).latents, expected.latents, atol=1e-4)
    assert not torch.allclose(run(remote, frame_init_cutoff=None).latents, expected.latents, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of"):
        consisti2v(remote, image[:, :, :63], "x", num_frames=3)


def test_frame_init_keeps_the_static_videos_low_frequencies():
    from diffusers import DDIMScheduler

    from swarm.video.consisti2v import frame_init, low_pass_mask

    generator = torch.Generator().manual_seed(0)
    static = torch.randn(1, 4, 1, 8, 8, generator=generator).expand(1, 4, 4, 8, 8)
    noise = torch.randn(1, 4, 4, 8, 8, generator=generator)
    scheduler = DDIMScheduler()
    t = torch.tensor(999)
    mixed = frame_init(static, noise, scheduler, t, cutoff=0.25)
    noised = scheduler.add_noise(static, noise, t.reshape(1))
    spectrum = torch.fft.fftn(mixed, dim=(-3, -2, -1))
    # at frequency 0 the mask is 1: the mean comes from the noised static video; far from it, from the noise
    assert torch.allclose(spectrum[..., 0, 0, 0], torch.fft.fftn(noised, dim=(-3, -2, -1))[..., 0, 0, 0], atol=1e-4)
    mask = low_pass_mask((4, 8, 8), 0.25)
    assert mask[0, 0, 0] == 1 and mask[2, 4, 4] < 0.01
    with pytest.raises(ValueError, match="cutoffs"):
        low_pass_mask((4, 8, 8), 0.0)
