"""Training through served U-Nets: gradients through two real servers' levels (their weights frozen) equal local
autograd of the whole U-Net, for the inputs and for the parameters the client holds; bad backward steps are refused
with clear errors and the session goes on.

Tolerance: the forward through the swarm is bitwise the local one, and each server recomputes its levels and
differentiates them with the same operations, but the gradients of a tensor used in several places (the sample
entering a level feeds its down output and its skips; the time embedding and the encoder states feed every block)
are summed in another order: by autograd within a server, by the client across servers. Float32 sums in another
order differ by a few ulps, so gradients are compared with a relative tolerance of 1e-5 (observed: below 6e-7 of
the largest gradient).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_diffusion import as_served

from swarm import AutoDistributedPipeline
from swarm.blocks.unet import run_head
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.hub.tiny_diffusion import save_tiny_sd, save_tiny_text_to_video
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream

RTOL = 1e-5
PIPELINES = {"sd": save_tiny_sd, "video": save_tiny_text_to_video}
CLIENT_PARAMETERS = ("conv_in.weight", "time_embedding.linear_1.weight")  # computed in the client's head


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def served(request, launcher, models_dir):
    path = models_dir / f"backward-{request.param}"
    if not path.exists():
        PIPELINES[request.param](path)
    first, second = launcher.start_halves(path, in_process=True)  # levels 0:1 and 1:3
    local = as_served(DiffusionPipeline.from_pretrained(path).unet)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none").unet
    yield {"name": request.param, "local": local, "remote": remote, "servers": [first, second]}
    remote.shutdown()


def _inputs(name: str, unet, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 4, size, size) if name == "sd" else (1, 4, 3, size, size)  # a video: (batch, channels, frames, h, w)
    sample = torch.randn(*shape, generator=generator)
    ehs = torch.randn(shape[0], 7, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), ehs


def _gradients(unet, parameters: list[torch.nn.Parameter], calls: list[tuple]) -> tuple[list, list]:
    """Outputs of ``calls`` (sample, timestep, ehs) and the gradients of a fixed weighted sum of them w.r.t. every
    call's sample and ehs, then ``parameters``."""
    leaves, loss, outputs = [], 0.0, []
    for index, (sample, timestep, ehs) in enumerate(calls):
        sample, ehs = sample.clone().requires_grad_(True), ehs.clone().requires_grad_(True)
        output = unet(sample, timestep, encoder_hidden_states=ehs).sample
        weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(100 + index))
        loss = loss + (output * weights).sum()
        leaves += [sample, ehs]
        outputs.append(output.detach())
    return outputs, list(torch.autograd.grad(loss, leaves + parameters))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((actual - expected).abs().max() <= RTOL * expected.abs().max())


def _served(server, kind: str) -> int:
    return server.server.rpc_info()["served"].get(kind, 0)


@pytest.fixture
def trainable(served):
    """The client's head and the local U-Net with the parameters the client would train requiring grad."""
    pairs = [(served["local"].get_parameter(name), served["remote"].local.get_parameter(name))
             for name in CLIENT_PARAMETERS]
    for local, remote in pairs:
        local.requires_grad_(True)
        remote.requires_grad_(True)
    yield [local for local, _ in pairs], [remote for _, remote in pairs]
    for local, remote in pairs:
        local.requires_grad_(False)
        remote.requires_grad_(False)


@pytest.mark.parametrize("size", [8, 7])  # 7: an odd latent size, upsampled to explicit sizes
def test_gradients_through_the_swarm_equal_local_autograd(served, trainable, size):
    """Gradients w.r.t. the latents, the encoder hidden states and the client's own head parameters, through both
    servers' down, mid and up blocks, equal local autograd of the whole U-Net; the servers ran the backward steps
    (the first server one of each, the one holding the mid block a down_backward)."""
    local_params, remote_params = trainable
    call = _inputs(served["name"], served["local"], size=size)
    before = [{kind: _served(server, kind) for kind in ("up_backward", "down_backward")}
              for server in served["servers"]]
    expected_out, expected = _gradients(served["local"], local_params, [call])
    out, grads = _gradients(served["remote"], remote_params, [call])
    assert torch.equal(out[0], expected_out[0])  # the forward is the local one, bit for bit
    for name, actual, reference in zip(["sample", "encoder_hidden_states", *CLIENT_PARAMETERS], grads, expected,
                                       strict=True):
        assert reference.abs().max() > 0, name  # a gradient that really flows
        assert _close(actual, reference), (name, (actual - reference).abs().max(), reference.abs().max())
    first, second = ({kind: _served(server, kind) - before[i][kind] for kind in before[i]}
                     for i, server in enumerate(served["servers"]))
    assert first == {"up_backward": 1, "down_backward": 1} and second == {"up_backward": 0, "down_backward": 1}


def test_a_loss_over_several_calls_and_a_closed_session(served, trainable):
    """Servers keep nothing for a backward: two U-Net calls then one backward give local autograd's gradients, and
    so does a backward whose session was closed after its forward (the evaluation runs again on a new chain)."""
    local_params, remote_params = trainable
    calls = [_inputs(served["name"], served["local"], seed) for seed in (1, 2)]
    _, expected = _gradients(served["local"], local_params, calls)
    _, grads = _gradients(served["remote"], remote_params, calls)
    assert all(_close(a, b) for a, b in zip(grads, expected, strict=True))

    remote = served["remote"]
    sample, timestep, ehs = (t.clone() for t in calls[0])
    sample.requires_grad_(True)
    output = remote(sample, timestep, encoder_hidden_states=ehs).sample
    remote.close_session()  # as a new prompt or the idle closer would
    output.sum().backward()
    sample_ref = calls[0][0].clone().requires_grad_(True)
    served["local"](sample_ref, timestep, encoder_hidden_states=ehs).sample.sum().backward()
    assert _close(sample.grad, sample_ref.grad)
    assert remote.session is None  # the session reopened for that backward was closed again
    with torch.no_grad():  # and inference is still exact
        assert torch.equal(remote(*calls[1]).sample, served["local"](*calls[1]).sample)


@pytest.mark.parametrize("served", ["sd"], indirect=True)
def test_bad_backward_steps_get_clear_errors_and_the_session_goes_on(served):
    """Backward steps with inputs that do not fit are refused with a message saying why (before any compute where
    the inputs say so); the session goes on, and a valid backward equals local autograd of the server's block."""
    local = served["local"]
    sample, timestep, ehs = _inputs("sd", local)
    with torch.no_grad():
        head = run_head(local, sample, timestep, ehs)
    x = head.sample.clone().requires_grad_(True)
    out, _ = local.down_blocks[0](hidden_states=x, temb=head.temb, encoder_hidden_states=head.encoder_hidden_states)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (expected,) = torch.autograd.grad(out, x, grad_output)
    manager = served["remote"].manager
    first, second = (server.maddr.rsplit("/p2p/", 1)[1] for server in served["servers"])
    nan = grad_output.clone()
    nan[0, 0, 0, 0] = float("nan")

    def step(kind: str, grad: torch.Tensor = grad_output, **more) -> dict:
        return {"type": kind, "step_id": 1, "sample": serialize_tensor(head.sample),
                "temb": serialize_tensor(head.temb), "input_sizes": [], "grad_output": serialize_tensor(grad),
                "output_codec": "none", **more}

    async def opened(peer: str, start: int, end: int) -> Stream:
        stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
        await stream.request({"type": "open", "start": start, "end": end, "output_codec": "none",
                              "encoder_hidden_states": serialize_tensor(head.encoder_hidden_states)}, 10)
        return stream

    async def exchange() -> None:
        stream = await opened(first, 0, 1)
        try:
            for message, error in [
                ({k: v for k, v in step("down_backward").items() if k != "sample"}, "missing tensor 'sample'"),
                (step("down_backward", nan), "grad_output contains NaN or infinite values"),
                (step("down_backward", torch.randn(2, 32, 8, 8)), r"grad_output has shape \[2, 32, 8, 8\], but "
                                                                  r"this pass's output has \[2, 32, 4, 4\]"),
                (step("down_backward", torch.randn(3, 32, 4, 4)), "grad_output has batch 3"),
                (step("up_backward"), "missing tensor 'up_sample'"),
                (step("up_backward", up_sample=serialize_tensor(torch.randn(2, 64, 4, 4))), "does not fit level 0"),
                (step("down_backward", temb=serialize_tensor(torch.randn(2, 7))), "temb has width 7"),
            ]:
                with pytest.raises(RemoteError, match=error):
                    await stream.request(message, 30)
            reply = await stream.request(step("down_backward"), 30)
            assert _close(deserialize_tensor(reply["grad_sample"]), expected)
            assert deserialize_tensor(reply["grad_encoder_hidden_states"]).shape == head.encoder_hidden_states.shape
        finally:
            stream.close()
        stream = await opened(second, 1, 3)
        try:
            with pytest.raises(RemoteError, match="hold the mid block"):
                await stream.request(step("up_backward"), 30)
        finally:
            stream.close()

    manager.loop.run(exchange())
    sample.requires_grad_(True)
    output = served["remote"](sample, timestep, encoder_hidden_states=ehs).sample
    with pytest.raises(ValueError, match="NaN or infinite"):  # refused by the client before it is sent
        output.backward(torch.full_like(output, float("nan")))


@pytest.mark.parametrize("served", ["video"], indirect=True)
def test_gradients_with_the_sessions_attention_processors(served, trainable):
    """The servers recompute their levels with the session's attention processors (here ConsistI2V's first-frame
    attention): gradients still equal local autograd of the U-Net with the same processors."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from swarm.blocks.unet_modifiers import first_frame_processors

    local, remote = served["local"], served["remote"]
    local_params, remote_params = trainable
    call = _inputs("video", local, seed=4)
    frames = call[0].shape[2]
    local.set_attn_processor(first_frame_processors(local, frames))
    remote.set_attn_processor(first_frame_processors(remote, frames))
    try:
        expected_out, expected = _gradients(local, local_params, [call])
        out, grads = _gradients(remote, remote_params, [call])
    finally:
        local.set_attn_processor(AttnProcessor2_0())
        remote.set_default_attn_processor()
    with torch.no_grad():
        plain = local(*call).sample
    assert not torch.allclose(expected_out[0], plain)  # the processors change the output
    assert torch.equal(out[0], expected_out[0])
    assert all(_close(a, b) for a, b in zip(grads, expected, strict=True))
