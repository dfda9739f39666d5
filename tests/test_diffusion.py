"""Diffusion U-Nets: the staged forward equals the monolithic one for every supported class, and pipelines whose
U-Net runs on real servers (U-shaped: skips stay on the servers) equal the local pipelines."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_diffusion import UNET_KINDS, tiny_unet, tiny_unet_inputs

from swarm import AutoDistributedPipeline, LatentShiftUNet
from swarm.blocks.unet import UNetLevels, num_levels, run_head, run_tail
from swarm.client.pipeline import latent_shift_pipeline
from swarm.compression import serialize_tensor
from swarm.dht.node import start_dht, stop_dht
from swarm.hub.tiny_diffusion import save_tiny_sd, save_tiny_sdxl, save_tiny_text_to_video
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream, call
from swarm.utils.loop_thread import LoopThread


def staged(unet, args: tuple, kwargs: dict, split: int) -> torch.Tensor:
    """Head, levels [0, split) and [split, n+1) as two servers would run them, then the tail."""
    head = run_head(unet, *args, **kwargs)
    parts = [UNetLevels(unet, 0, split), UNetLevels(unet, split, num_levels(unet))]
    n = num_levels(unet) - 1
    sample, sizes, stashes = head.sample, [], {}
    for part in parts:
        for level in range(part.start, part.end):
            if level < n:
                sizes.append(tuple(sample.shape[-2:]))
            sample, stashes[level] = part.down(level, sample, head.temb, head.encoder_hidden_states, head.extra)
    for part in reversed(parts):
        for level in reversed(range(part.start, min(part.end, n))):
            size = part.upsample_size(level, sizes, head.forward_upsample_size)
            sample = part.up(level, sample, head.temb, head.encoder_hidden_states, head.extra, stashes[level], size)
    return run_tail(unet, sample, head)


@pytest.mark.parametrize("kind", UNET_KINDS)
@pytest.mark.parametrize("size", [16, 15])
def test_staged_forward_equals_monolithic_exactly(kind, size):
    unet = tiny_unet(kind)
    args, kwargs = tiny_unet_inputs(kind, batch=2, frames=3, size=size)
    with torch.no_grad():
        expected = unet(*args, **kwargs, return_dict=False)[0]
        for split in range(1, num_levels(unet)):
            assert torch.equal(staged(unet, args, kwargs, split), expected), (kind, size, split)


PIPELINES = {
    "sd": (save_tiny_sd, dict(height=64, width=64)),
    "sdxl": (save_tiny_sdxl, dict(height=64, width=64)),
    "video": (save_tiny_text_to_video, dict(height=64, width=64, num_frames=3)),
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def served_pipeline(request, launcher, models_dir):
    save, call_kwargs = PIPELINES[request.param]
    path = save(models_dir / f"tiny-{request.param}-pipeline")
    first, _ = launcher.start_halves(path, in_process=True)  # levels 0:1 and 1:3
    local = DiffusionPipeline.from_pretrained(path)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"name": request.param, "path": path, "peers": [first.maddr], "local": local, "remote": remote,
           "kwargs": call_kwargs}
    remote.unet.shutdown()


@pytest.mark.parametrize("save", [save_tiny_sd, save_tiny_sdxl], ids=["sd", "sdxl"])
def test_image_unet_servers_announce_a_speed_before_their_first_request(save, launcher, models_dir):
    """Routing needs a speed from the start: an image U-Net server times its levels' down passes once at start
    (then follows the evaluations it serves)."""
    path = models_dir / f"speed-{save.__name__}"
    if not path.exists():
        save(path)
    first, second = launcher.start_halves(path, in_process=True)  # levels 0:1 and 1:3, with the mid block
    for server in (first, second):
        info = server.server.rpc_info()
        assert not any(info["served"][kind] for kind in ("down", "up")), info["served"]  # nothing served yet
        assert info["inference_rps"] > 0 and info["forward_tps"] > 0, info


def _generate(pipe, kwargs: dict, prompt: str = "a tiny test", seed: int = 0, **more):
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np",
                **kwargs, **more)


def test_distributed_pipeline_equals_local(served_pipeline):
    kwargs = served_pipeline["kwargs"]
    out = _generate(served_pipeline["remote"], kwargs)
    ref = _generate(served_pipeline["local"], kwargs)
    images = "frames" if served_pipeline["name"] == "video" else "images"
    assert getattr(out, images).shape == getattr(ref, images).shape
    assert (getattr(out, images) == getattr(ref, images)).all()
    assert served_pipeline["remote"].unet.session is None  # closed with the call: servers freed its state


def test_servers_announce_the_speed_measured_on_evaluations(served_pipeline):
    """U-Net levels have no synthetic speed test at start: each server times the evaluations it serves and
    announces evaluations/s (at batch 2 and the model's sample size) like an LLM span's decode steps/s."""
    from swarm.rpc import protocol
    from swarm.rpc.client import call

    _generate(served_pipeline["remote"], served_pipeline["kwargs"])
    manager = served_pipeline["remote"].unet.manager
    infos = [manager.loop.run(call(manager.p2p, peer, protocol.INFO, {}, timeout=10))
             for peer in manager.servers]
    assert len(infos) == 2
    for info in infos:
        assert info["inference_rps"] > 0 and info["forward_tps"] > info["inference_rps"], info


def test_odd_latent_size_through_the_swarm(served_pipeline):
    kwargs = {**served_pipeline["kwargs"], "height": 120, "width": 120}  # latents 15 x 15
    out = _generate(served_pipeline["remote"], kwargs)
    ref = _generate(served_pipeline["local"], kwargs)
    images = "frames" if served_pipeline["name"] == "video" else "images"
    assert (getattr(out, images) == getattr(ref, images)).all()


def _one_evaluation(pipe, seed: int = 0):
    """Inputs of one U-Net evaluation as the SD pipeline would make them (batch 2: classifier-free guidance)."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), ehs


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_skips_never_cross_the_network(served_pipeline):
    unet = served_pipeline["remote"].unet
    sample, timestep, ehs = _one_evaluation(served_pipeline["remote"])

    def evaluation_bytes(carry_skips: bool) -> list[int]:
        unet.carry_skips = carry_skips
        try:
            with torch.no_grad():
                unet(sample, timestep, ehs)
            return [hop.sent + hop.received for hop in unet.session.traffic[-1]]
        finally:
            unet.close_session()
            unet.carry_skips = False

    u_shaped, linear = evaluation_bytes(False), evaluation_bytes(True)
    # The tensors that must cross the first hop (level 0) in each direction, and level 0's skips, from a local run.
    local = served_pipeline["local"].unet
    with torch.no_grad():
        head = run_head(local, sample, timestep, ehs)
        levels = UNetLevels(local, 0, num_levels(local))
        down_out, stash = levels.down(0, head.sample, head.temb, head.encoder_hidden_states, head.extra)
        deeper, deeper_stash = levels.down(1, down_out, head.temb, head.encoder_hidden_states, head.extra)
        deeper = levels.down(2, deeper, head.temb, head.encoder_hidden_states, head.extra)[0]
        up_in = levels.up(1, deeper, head.temb, head.encoder_hidden_states, head.extra, deeper_stash, None)
        up_out = levels.up(0, up_in, head.temb, head.encoder_hidden_states, head.extra, stash, None)
    crossing = sum(t.numel() * 4 for t in (head.sample, down_out, up_in, up_out, head.temb))
    skips = sum(t.numel() * 4 for t in stash.skips)
    assert abs(u_shaped[0] - crossing) < 2048  # the samples, the time embedding and message fields: nothing else
    assert linear[0] - u_shaped[0] >= 2 * skips  # a linear chain carries the skips there and back
    assert skips > 0.5 * crossing


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_8bit_activations_stay_close(served_pipeline):
    compressed = AutoDistributedPipeline.from_pretrained(served_pipeline["path"],
                                                         initial_peers=served_pipeline["peers"])
    try:
        sample, timestep, ehs = _one_evaluation(compressed, seed=1)
        with torch.no_grad():
            exact = served_pipeline["remote"].unet(sample, timestep, ehs).sample
            approximate = compressed.unet(sample, timestep, ehs).sample
        error = ((approximate - exact).norm() / exact.norm()).item()
        assert 0 < error < 2e-2, error  # 8-bit between servers, float16 at the ends (observed ~3e-3)
    finally:
        compressed.unet.shutdown()
        served_pipeline["remote"].unet.close_session()


def test_latent_shift_one_frame_is_the_image_model_and_shifts_stay_within_a_video():
    unet = tiny_unet("sd")
    video = LatentShiftUNet(unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 5, 16, 16, generator=generator)  # two videos of 5 frames
    ehs = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        one_frame = video(latents[:, :, :1], 10, ehs).sample[:, :, 0]
        assert torch.equal(one_frame, unet(latents[:, :, 0], 10, ehs).sample)
        base = video(latents, 10, ehs).sample
        changed = latents.clone()
        changed[0, :, 0] += 1.0  # touch frame 0 of the first video only
        moved = video(changed, 10, ehs).sample
    difference = (moved - base).abs().amax(dim=(1, 3, 4))  # per video and frame
    assert (difference[0, 1:] > 0).all()  # the shift carries the change to the later frames of that video
    assert (difference[1] == 0).all()  # and never to the other video
    plain = unet(latents.permute(0, 2, 1, 3, 4).reshape(10, 4, 16, 16), 10, ehs.repeat_interleave(5, 0)).sample
    assert not torch.allclose(base.permute(0, 2, 1, 3, 4).reshape(10, 4, 16, 16), plain)  # it is not a no-op


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_latent_shift_through_the_swarm_equals_local(served_pipeline):
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 3, 8, 8, generator=generator)
    ehs = torch.randn(1, 77, 32, generator=generator)
    local, remote = LatentShiftUNet(served_pipeline["local"].unet), LatentShiftUNet(served_pipeline["remote"].unet)
    try:
        with torch.no_grad():
            assert torch.equal(remote(latents, 20, ehs).sample, local(latents, 20, ehs).sample)
    finally:
        served_pipeline["remote"].unet.close_session()


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_latent_shift_text_to_video_in_one_call_equals_local(served_pipeline):
    """An SD directory becomes a Latent-Shift text-to-video pipeline in one call; its frames equal the same
    algorithm run locally, and the call closes its swarm session."""
    path, peers = served_pipeline["path"], served_pipeline["peers"]
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=peers, compression="none", latent_shift=True)
    local = latent_shift_pipeline(DiffusionPipeline.from_pretrained(path))
    try:
        kwargs = dict(num_frames=3, height=64, width=64)
        out, ref = _generate(remote, kwargs).frames, _generate(local, kwargs).frames
        assert out.shape == ref.shape == (1, 3, 64, 64, 3) and (out == ref).all()
        assert not (ref[0, 0] == ref[0, 1]).all()  # frames differ: a video, not one image repeated
        assert remote.unet.session is None
    finally:
        remote.unet.shutdown()


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_a_hand_built_pipeline_frees_its_servers_when_idle(served_pipeline):
    """A pipeline built around a RemoteUNet by hand never says when its generation ends: the client closes a U-Net
    session left idle (here 1 s), and the servers hold no session for it afterwards."""
    from diffusers import TextToVideoSDPipeline

    image = AutoDistributedPipeline.from_pretrained(served_pipeline["path"], initial_peers=served_pipeline["peers"],
                                                    compression="none", diffusion_idle_close=1.0)
    manager = image.unet.manager
    peers = [maddr.rsplit("/p2p/", 1)[1] for maddr in served_pipeline["peers"]]

    def server_sessions() -> int:
        async def count() -> int:
            servers = {hop.span.peer_id for hop in image.unet.session.hops} if image.unet.session else set(peers)
            return sum([(await call(manager.p2p, peer, protocol.INFO, {}, 10))["sessions"] for peer in servers])

        return manager.loop.run(count())

    video = TextToVideoSDPipeline(vae=image.vae, text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                                  unet=LatentShiftUNet(image.unet), scheduler=image.scheduler)
    try:
        _generate(video, dict(num_frames=3, height=64, width=64))
        assert image.unet.session is not None and server_sessions() >= 2  # still open: nobody closed it
        deadline = time.monotonic() + 15
        while image.unet.session is not None:
            assert time.monotonic() < deadline, "the idle session was not closed"
            time.sleep(0.2)
        assert server_sessions() == 0
    finally:
        image.unet.shutdown()


@pytest.mark.parametrize("served_pipeline", ["sd", "video"], indirect=True)
def test_freeu_on_the_servers_equals_local_freeu(served_pipeline):
    """``pipe.enable_freeu`` applies FreeU's factors on the servers, in this client's sessions only: the output equals
    the local pipeline's with the same factors (and differs from the plain one); disabling it restores the plain
    output, and a request with factors out of range is refused."""
    remote, local, kwargs = served_pipeline["remote"], served_pipeline["local"], served_pipeline["kwargs"]
    images = "frames" if served_pipeline["name"] == "video" else "images"
    plain = getattr(_generate(local, kwargs), images)
    factors = dict(s1=0.6, s2=0.4, b1=1.5, b2=1.6)
    remote.enable_freeu(**factors)
    local.enable_freeu(**factors)
    try:
        out, ref = getattr(_generate(remote, kwargs), images), getattr(_generate(local, kwargs), images)
        assert (out == ref).all() and not (ref == plain).all()
    finally:
        remote.disable_freeu()
        local.disable_freeu()
    assert (getattr(_generate(remote, kwargs), images) == plain).all()

    remote.unet.freeu = {"s1": 1.0, "s2": 1.0, "b1": 1e9, "b2": 1.0}  # what enable_freeu would never send
    try:
        with pytest.raises(RemoteError, match="freeu must map"):
            _generate(remote, kwargs)
    finally:
        remote.unet.freeu = None


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_what_would_be_a_silent_no_op_remotely_is_refused(served_pipeline):
    """Attention processors that are code (not one of the named ones servers know), hooks on blocks and their
    submodules would act on blocks that run on the servers: a clear error instead of an accepted call that changes
    nothing. The pipeline works afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    pipe = served_pipeline["remote"]
    with pytest.raises(NotImplementedError, match="cannot run on the swarm's servers"):
        pipe.unet.set_attn_processor(SlicedAttnProcessor(2))
    with pytest.raises(ValueError, match="no attention layer is named 'nowhere.attn1'"):
        pipe.unet.set_attn_processor({"nowhere.attn1.processor": AttnProcessor2_0()})
    processors = pipe.unet.attn_processors
    assert processors.keys() == served_pipeline["local"].unet.attn_processors.keys()
    assert all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    with pytest.raises(NotImplementedError, match="never fire"):
        pipe.unet.up_blocks[1].register_forward_hook(lambda *args: None)
    with pytest.raises(AttributeError, match="runs in the swarm"):
        list(pipe.unet.up_blocks[1].resnets)
    with pytest.raises(NotImplementedError, match="cross_attention_kwargs"):  # IP adapters' (a LoRA scale is served)
        _generate(pipe, served_pipeline["kwargs"], cross_attention_kwargs={"scale": 0.5,
                                                                           "ip_adapter_masks": [torch.ones(1, 8, 8)]})
    out = _generate(pipe, served_pipeline["kwargs"]).images
    assert (out == _generate(served_pipeline["local"], served_pipeline["kwargs"]).images).all()


def test_generation_survives_a_killed_server(tmp_path, models_dir):
    import signal

    from swarm.local_swarm import LocalSwarm

    path = models_dir / "tiny-sd-pipeline"
    if not path.exists():
        save_tiny_sd(path)
    with LocalSwarm(tmp_path) as launcher:
        first = launcher.start_server_in_process(path, "0:1", [])
        fast = launcher.start_server(path, "1:3", [first.maddr], "--throughput", "1000")
        launcher.start_server_in_process(path, "1:3", [first.maddr], "--throughput", "1")
        remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
        local = DiffusionPipeline.from_pretrained(path)
        try:
            def kill_after_first_step(pipe, step, timestep, callback_kwargs):
                if step == 0:
                    assert pipe.unet.session.hops[-1].span.peer_id == fast.peer_id
                    fast.signal(signal.SIGKILL)
                return callback_kwargs

            out = _generate(remote, dict(height=64, width=64), callback_on_step_end=kill_after_first_step)
            assert (out.images == _generate(local, dict(height=64, width=64)).images).all()
        finally:
            remote.unet.shutdown()


@pytest.mark.parametrize("kind", ["svd", "i2vgenxl", "motion"])
def test_video_unets_through_the_swarm_equal_local(kind, tmp_path):
    """The video U-Nets without a pipeline test of their own: one evaluation of a saved U-Net served by two
    servers equals the local U-Net, with each class's extra inputs (SVD's added time ids and image-only indicator,
    I2VGenXL's fps and image latents, AnimateDiff's per-frame text states) crossing the network."""
    from swarm.blocks.unet import load_head_and_tail
    from swarm.client.config import ClientConfig
    from swarm.client.diffusion import RemoteUNet
    from swarm.hub.source import resolve_model
    from swarm.local_swarm import LocalSwarm

    unet = tiny_unet(kind)
    path = tmp_path / f"tiny-{kind}-unet"
    unet.save_pretrained(path)
    args, kwargs = tiny_unet_inputs(kind, batch=2, frames=3, size=15)
    with torch.no_grad():
        expected = unet(*args, **kwargs, return_dict=False)[0]
    with LocalSwarm(tmp_path / "logs") as launcher:
        first, _ = launcher.start_halves(path, in_process=True)
        config = ClientConfig(initial_peers=[first.maddr], compression="none")
        remote = RemoteUNet(load_head_and_tail(resolve_model(path)), config, path.name)
        try:
            with torch.no_grad():
                output = remote(*args, **kwargs, return_dict=False)[0]
            assert [hop.span.start for hop in remote.session.hops] == [0, 1]  # both servers took part
        finally:
            remote.shutdown()
    assert torch.equal(output, expected)


def test_bfloat16_servers_serve_a_float32_pipeline(tmp_path, models_dir):
    """Servers started with --dtype bfloat16 compute in bfloat16 and answer in the client's dtype."""
    from swarm.local_swarm import LocalSwarm

    path = models_dir / "tiny-sd-pipeline"
    if not path.exists():
        save_tiny_sd(path)
    with LocalSwarm(tmp_path) as launcher:
        first = launcher.start_server_in_process(path, "0:1", [], "--dtype", "bfloat16")
        launcher.start_server_in_process(path, "1:3", [first.maddr], "--dtype", "bfloat16")
        remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr])
        try:
            out = _generate(remote, dict(height=64, width=64)).images
        finally:
            remote.unet.shutdown()
    ref = _generate(DiffusionPipeline.from_pretrained(path), dict(height=64, width=64)).images
    assert abs(out - ref).max() < 0.1  # bfloat16 blocks, 8-bit between servers (observed 0.03)


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_malformed_evaluations_get_clear_errors_and_the_session_goes_on(served_pipeline):
    """Requests that would reach the blocks with inputs they cannot take are refused with a message saying why;
    the session stays usable and a valid evaluation still equals the local blocks."""
    from swarm.blocks.unet import run_head
    from swarm.compression import deserialize_tensor, serialize_tensor
    from swarm.rpc import protocol
    from swarm.rpc.client import RemoteError, Stream

    local = served_pipeline["local"].unet
    sample, timestep, ehs = _one_evaluation(served_pipeline["local"])
    with torch.no_grad():
        head = run_head(local, sample, timestep, ehs)
        expected, _ = local.down_blocks[0](hidden_states=head.sample, temb=head.temb,
                                           encoder_hidden_states=head.encoder_hidden_states)

    def down(x: torch.Tensor = head.sample, temb: torch.Tensor = head.temb) -> dict:
        return {"type": "down", "step_id": 1, "sample": serialize_tensor(x), "temb": serialize_tensor(temb),
                "input_sizes": [], "output_codec": "none"}

    manager = served_pipeline["remote"].unet.manager
    peer = served_pipeline["peers"][0].rsplit("/p2p/", 1)[1]  # holds level 0 only

    async def exchange() -> None:
        stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
        try:
            with pytest.raises(RemoteError, match="attends to 32"):
                await stream.request({"type": "open", "start": 0, "end": 1, "output_codec": "none",
                                      "encoder_hidden_states": serialize_tensor(torch.randn(2, 77, 999))}, 10)
        finally:
            stream.close()
        stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
        try:
            await stream.request({"type": "open", "start": 0, "end": 1, "output_codec": "none",
                                  "encoder_hidden_states": serialize_tensor(head.encoder_hidden_states)}, 10)
            for message, error in [
                (down(temb=torch.randn(2, 7)), "temb has width 7"),
                (down(torch.randn(3, 32, 8, 8), torch.randn(3, head.temb.shape[1])), "differs from the encoder"),
                (down(torch.randn(1, 1, 1100, 1000), torch.randn(1, head.temb.shape[1])), "must be at most 1048576"),
                ({**down(), "type": "up", "sample": serialize_tensor(torch.randn(2, 3, 4, 4)), "input_sizes": [[8, 8]]},
                 "needs the 'down' pass"),
            ]:
                with pytest.raises(RemoteError, match=error):
                    await stream.request(message, 30)
            reply = await stream.request(down(head.sample.half()), 30)  # another dtype: cast, answered in it
            assert deserialize_tensor(reply["sample"]).dtype == torch.float16
            with pytest.raises(RemoteError, match="do not fit the U-Net's levels"):  # an up that fits no skips
                await stream.request({**down(), "type": "up", "sample": serialize_tensor(torch.randn(2, 5, 4, 4)),
                                      "input_sizes": [[8, 8]]}, 30)
            reply = await stream.request(down(), 30)
            assert torch.allclose(deserialize_tensor(reply["sample"]), expected, atol=1e-5)
        finally:
            stream.close()

    manager.loop.run(exchange())


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_unet_requests_are_bounded_before_any_compute(served_pipeline):
    """What made a U-Net server compute a 256 MB tensor, attend for a minute or hold a 64 MB prompt is refused from
    the request itself, with a clear error, and the server goes on serving."""
    pipe = served_pipeline["local"]
    local = pipe.unet
    sample, timestep, ehs = _one_evaluation(pipe)
    with torch.no_grad():
        head = run_head(local, sample, timestep, ehs)
    manager = served_pipeline["remote"].unet.manager
    first = served_pipeline["peers"][0].rsplit("/p2p/", 1)[1]
    manager.loop.run(manager.update(force=True))
    second = next(peer for peer, info in manager.servers.items() if info.start == 1)
    width = head.encoder_hidden_states.shape[-1]

    def opening(**fields) -> dict:
        return {"type": "open", "start": 0, "end": 1, "output_codec": "none",
                "encoder_hidden_states": serialize_tensor(head.encoder_hidden_states), **fields}

    async def refused(peer: str, messages: list[dict], error: str) -> None:
        stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
        try:
            for message in messages[:-1]:
                await stream.request(message, 30)
            with pytest.raises(RemoteError, match=error):
                await stream.request(messages[-1], 30)
        finally:
            stream.close()

    async def exchange() -> None:
        # a prompt of 5000 tokens per row (64 MB of it was accepted before)
        await refused(first, [opening(encoder_hidden_states=serialize_tensor(torch.randn(2, 5000, width)))],
                      "5000 tokens per row; this server takes at most 4096")
        # 256 x 256 latents: 65536 positions attend to each other at level 0 (a minute of compute per request)
        await refused(first, [opening(sample_shape=[1, 4, 256, 256])], "attends over 65536 positions at level 0")
        # a 4x4 sample claiming a 1024x1024 level above: it would have upsampled to a 256 MB tensor
        second_open = {"type": "open", "start": 1, "end": 3, "output_codec": "none", "forward_upsample_size": True,
                       "encoder_hidden_states": serialize_tensor(head.encoder_hidden_states)}
        down = {"type": "down", "step_id": 1, "sample": serialize_tensor(torch.randn(2, 32, 4, 4)),
                "temb": serialize_tensor(head.temb), "input_sizes": [[1024, 1024]], "output_codec": "none"}
        await refused(second, [second_open, down], r"input_sizes \[\[1024, 1024\]\] do not lead down")
        nan = head.sample.clone()
        nan[0, 0, 0, 0] = float("nan")
        await refused(first, [opening(), {"type": "down", "step_id": 1, "sample": serialize_tensor(nan),
                                          "temb": serialize_tensor(head.temb), "input_sizes": [],
                                          "output_codec": "none"}], "sample contains NaN or infinite values")

    manager.loop.run(exchange())
    out = _generate(served_pipeline["remote"], served_pipeline["kwargs"])
    ref = _generate(served_pipeline["local"], served_pipeline["kwargs"])
    assert (out.images == ref.images).all()


@pytest.mark.parametrize("served_pipeline", ["sd"], indirect=True)
def test_one_peer_cannot_take_every_generation(served_pipeline):
    """Generations share the server's session memory with a per-peer share: a peer holding its share is told the
    server is busy (it is not banned for that), and another client still generates."""
    first = served_pipeline["peers"][0].rsplit("/p2p/", 1)[1]
    pipe = served_pipeline["local"]
    sample, timestep, ehs = _one_evaluation(pipe)
    with torch.no_grad():
        head = run_head(pipe.unet, sample, timestep, ehs)
    opening = {"type": "open", "start": 0, "end": 1, "output_codec": "none", "sample_shape": [4, 4, 16, 16],
               "encoder_hidden_states": serialize_tensor(head.encoder_hidden_states.repeat(2, 1, 1))}

    async def hog() -> tuple[list[Stream], RemoteError]:
        streams = []
        while True:
            stream = await Stream.open(p2p, first, protocol.DIFFUSION, 10)
            try:
                await stream.request(opening, 30)
            except RemoteError as e:
                stream.close()
                return streams, e
            streams.append(stream)
            assert len(streams) <= 16, "no limit per peer"

    # the hog is a peer of its own (this process's models share one: swarm/client/node.py)
    loop, dht, streams = LoopThread(), None, []
    try:
        dht = p2p, _ = loop.run(start_dht(served_pipeline["peers"], host="127.0.0.1", client_mode=True))
        streams, error = loop.run(hog())
        assert "per-peer cache limit" in str(error) and error.busy, error
        other = AutoDistributedPipeline.from_pretrained(served_pipeline["path"], initial_peers=served_pipeline["peers"],
                                                         compression="none")
        try:
            out = _generate(other, served_pipeline["kwargs"])
        finally:
            other.unet.shutdown()
        assert (out.images == _generate(pipe, served_pipeline["kwargs"]).images).all()
    finally:
        for stream in streams:
            stream.close()
        if dht is not None:
            loop.run(stop_dht(*dht))
        loop.stop()
