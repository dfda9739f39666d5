"""LoRA adapters served beside U-Net levels: a session choosing adapters, weights and a per-call scale through real
servers gets exactly what a local pipeline with ``load_lora_weights`` computes; sessions with other choices
interleave on the same servers without seeing each other's; what cannot be served is refused clearly."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from swarm import AutoDistributedPipeline
from swarm.blocks.adapters import AdapterError
from swarm.blocks.unet import UNetLevels
from swarm.compression import serialize_tensor
from swarm.hub.source import resolve_model
from swarm.hub.tiny_diffusion import save_tiny_sd, save_tiny_unet_lora
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream


@pytest.fixture(scope="module")
def served(launcher, models_dir):
    path = save_tiny_sd(models_dir / "tiny-sd-lora")
    style = save_tiny_unet_lora(path, models_dir / "lora-style", seed=1)
    # rank 2 on two modules, no recorded config (alpha = rank): another shape of LoRA file
    detail = save_tiny_unet_lora(path, models_dir / "lora-detail", seed=2, rank=2, alpha=None,
                                 target_modules=("to_k", "to_v"))
    # with a text-encoder part, which clients load (pipe.load_lora_weights)
    both = save_tiny_unet_lora(path, models_dir / "lora-both", seed=3, text_encoder=True)
    first, second = launcher.start_halves(path, "--adapters", f"style={style}", f"detail={detail}", f"both={both}",
                                          in_process=True)
    local = DiffusionPipeline.from_pretrained(path)
    local.load_lora_weights(style, adapter_name="style")
    local.load_lora_weights(detail, adapter_name="detail")
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"path": path, "local": local, "remote": remote, "style": style, "both": both,
           "peers": [first.maddr, second.maddr]}
    remote.unet.shutdown()


def _inputs(seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor(500), torch.randn(2, 77, 32, generator=generator)


def _unet(pipe, args: tuple, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(*args, return_dict=False, **kwargs)[0]


def test_served_adapters_equal_a_local_lora_pipeline(served):
    local, remote = served["local"], served["remote"]
    args = _inputs(0)
    local.disable_lora()
    base = _unet(local, args)
    local.enable_lora()
    assert sorted(remote.unet.peft_config) == ["both", "detail", "style"]
    for names, weights, kwargs in ((["style"], [1.0], {}),
                                   (["style", "detail"], [0.7, 0.3], {"cross_attention_kwargs": {"scale": 0.5}}),
                                   (["detail"], [-1.5], {"cross_attention_kwargs": {"scale": 2.0}})):
        local.set_adapters(names, weights)
        remote.set_adapters(names, weights)  # diffusers' own pipeline method, through RemoteUNet.set_adapters
        expected = _unet(local, args, **kwargs)
        assert (expected - base).abs().max() > 1e-3  # the adapters change the output
        assert torch.equal(_unet(remote, args, **kwargs), expected), (names, weights, kwargs)
    assert remote.unet.active_adapters() == ["detail"]
    # a whole pipeline call with a LoRA scale, as a diffusers user writes it
    local.set_adapters(["style"], [0.8])
    remote.set_adapters(["style"], [0.8])
    call = {"prompt": "a red fox", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "latent",
            "cross_attention_kwargs": {"scale": 0.6}}
    expected = local(**call, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(remote(**call, generator=torch.Generator().manual_seed(3)).images, expected)
    # disabled: the base model, on the same servers
    remote.disable_lora()
    assert torch.equal(_unet(remote, args), base)
    remote.enable_lora()
    assert torch.equal(_unet(remote, args), _unet(local, args))


def test_load_lora_weights_takes_the_text_encoder_part_here_and_the_servers_adapter(served):
    """A diffusers user's ``pipe.load_lora_weights(path, adapter_name=NAME)`` on a distributed pipeline: the
    LoRA's text-encoder part is loaded on the client, as locally, and its U-Net part is the servers' adapter NAME;
    whole pipeline calls equal the local pipeline's, with and without a scale."""
    local = DiffusionPipeline.from_pretrained(served["path"])
    remote = AutoDistributedPipeline.from_pretrained(served["path"], initial_peers=served["peers"][:1],
                                                     compression="none")
    try:
        with pytest.raises(NotImplementedError, match="served for this U-Net: .*'both'"):
            remote.load_lora_weights(served["both"], adapter_name="mine")
        for pipe in (local, remote):
            pipe.load_lora_weights(served["both"], adapter_name="both")
        assert remote.unet.active_adapters() == ["both"]
        call = {"prompt": "a red fox", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "latent"}
        for kwargs in ({}, {"cross_attention_kwargs": {"scale": 0.6}}):
            expected = local(**call, **kwargs, generator=torch.Generator().manual_seed(3)).images
            assert torch.equal(remote(**call, **kwargs, generator=torch.Generator().manual_seed(3)).images, expected)
        local.unload_lora_weights()
        remote.unload_lora_weights()
        assert torch.equal(remote(**call, generator=torch.Generator().manual_seed(3)).images,
                           local(**call, generator=torch.Generator().manual_seed(3)).images)
    finally:
        remote.unet.shutdown()


def test_sessions_with_other_adapters_interleave_without_mixing(served):
    """Two clients evaluating in turn on the same servers, one with an adapter and one without: each gets its
    own local result every time (the servers set each call's choice on their LoRA layers)."""
    local, remote = served["local"], served["remote"]
    other = AutoDistributedPipeline.from_pretrained(served["path"], initial_peers=served["peers"][:1],
                                                    compression="none")
    try:
        remote.set_adapters(["style", "detail"], [1.0, 0.5])
        local.set_adapters(["style", "detail"], [1.0, 0.5])
        for seed in range(3):
            args = _inputs(seed)
            with_lora = _unet(local, args, cross_attention_kwargs={"scale": 0.9})
            local.disable_lora()
            plain = _unet(local, args)
            local.enable_lora()
            assert torch.equal(_unet(remote, args, cross_attention_kwargs={"scale": 0.9}), with_lora)
            assert torch.equal(_unet(other, args), plain)
    finally:
        other.unet.shutdown()


def test_training_through_served_adapters_matches_local_gradients(served):
    local, remote = served["local"], served["remote"]
    local.set_adapters(["style"], [0.5])
    remote.set_adapters(["style"], [0.5])
    sample, t, ehs = _inputs(4)
    grads = []
    for pipe in (local, remote):
        x = sample.clone().requires_grad_(True)
        pipe.unet(x, t, ehs, cross_attention_kwargs={"scale": 0.7}).sample.square().mean().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_lora_mistakes_get_clear_errors_and_servers_go_on(served, models_dir):
    local, remote = served["local"], served["remote"]
    with pytest.raises(NotImplementedError, match="--adapters NAME=PATH"):
        remote.load_lora_weights(served["style"], adapter_name="mine")
    with pytest.raises(NotImplementedError, match="from a path"):
        remote.unet.load_lora_adapter(str(served["style"]), adapter_name="style")
    with pytest.raises(NotImplementedError, match="--adapters"):
        remote.fuse_lora()
    with pytest.raises(NotImplementedError, match="cannot be saved"):  # it would write an unloadable pipeline
        remote.save_pretrained(models_dir / "saved-remote")
    with pytest.raises(ValueError, match="nope"):  # diffusers' own check, on what RemoteUNet.peft_config lists
        remote.set_adapters(["style", "nope"])
    with pytest.raises(ValueError, match=r"\['nope'\] are not served"):
        remote.unet.set_adapters(["style", "nope"])
    with pytest.raises(NotImplementedError, match="block-wise"):
        remote.unet.set_adapters("style", [{"down": 0.5}])

    manager = remote.unet.manager
    peer = served["peers"][0].rsplit("/p2p/", 1)[1]

    async def refused(adapters: object, scale: object = 1.0) -> str:
        stream = await Stream.open(manager.p2p, peer, protocol.DIFFUSION, 10)
        try:
            message = {"type": "open", "start": 0, "end": 1, "output_codec": "none", "adapters": adapters,
                       "encoder_hidden_states": serialize_tensor(torch.zeros(1, 77, 32)),
                       "sample_shape": [1, 4, 8, 8]}
            try:
                await stream.request(message, 10)
                await stream.request({"type": "down", "step_id": 0, "sample": serialize_tensor(torch.zeros(1, 4, 8, 8)),
                                      "temb": serialize_tensor(torch.zeros(1, 128)), "input_sizes": [],
                                      "lora_scale": scale}, 10)
            except RemoteError as e:
                return str(e)
            return ""
        finally:
            stream.close()

    assert "does not serve adapter 'nope'" in manager.loop.run(refused([["nope", 1.0]]))
    assert "weight must be a finite number" in manager.loop.run(refused([["style", float("nan")]]))
    assert "at most 8" in manager.loop.run(refused([["style", 1.0]] * 9))
    assert "lora_scale must be a finite number" in manager.loop.run(refused([["style", 1.0]], 1e9))
    # the servers go on serving everyone, exactly
    local.set_adapters(["detail"], [1.0])
    remote.set_adapters(["detail"], [1.0])
    args = _inputs(5)
    assert torch.equal(_unet(remote, args), _unet(local, args))


def test_adapters_servers_cannot_serve_are_refused_at_start(served, models_dir):
    path = served["path"]
    levels = UNetLevels.from_pretrained(resolve_model(str(path)), 1, 3)
    head = save_tiny_unet_lora(path, models_dir / "lora-head", target_modules=("conv_in", "to_q"))
    with pytest.raises(AdapterError, match="adapts conv_in, part of the U-Net's head or tail"):
        levels.load_adapters([str(head)])
    with pytest.raises(AdapterError, match="holds no pytorch_lora_weights.safetensors"):
        levels.load_adapters([f"x={path}"])
    # ranks that differ by module and no recorded config: diffusers would take the whole model's first rank as
    # every alpha, which levels 1:3 alone cannot know
    state = load_file(served["style"] / "pytorch_lora_weights.safetensors")
    mixed = {key: (value[:2] if "lora_A" in key else value[:, :2]).contiguous() if ".down_blocks.0." in key else value
             for key, value in state.items()}
    (models_dir / "lora-mixed").mkdir(exist_ok=True)
    save_file(mixed, models_dir / "lora-mixed" / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match="mixes LoRA ranks"):
        levels.load_adapters([f"mixed={models_dir / 'lora-mixed'}"])
    # a single .safetensors file is an adapter too
    levels.load_adapters([f"one={served['style'] / 'pytorch_lora_weights.safetensors'}", str(served["both"])])
    assert levels.adapter_names == ["one", "lora-both"]
