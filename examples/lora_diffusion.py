"""A diffusers LoRA through the swarm: servers serve it beside their U-Net levels, the client loads it as usual.

    python examples/lora_diffusion.py [SD_DIR LORA] [--initial-peers MADDR ...] [--scale S]

The servers are started with ``--adapters NAME=LORA`` (a directory written by diffusers' ``save_lora_weights``, or a
``.safetensors`` file diffusers reads); the client calls ``pipe.load_lora_weights(LORA, adapter_name=NAME)`` as on
a local pipeline: the LoRA's text-encoder part is loaded here, its U-Net part is the servers' adapter NAME. Each call
may scale it (``cross_attention_kwargs={"scale": S}``). The example generates through the swarm, then the same with
a local pipeline that loaded the LoRA, and prints the largest difference (0 with --compression none) and how much
the LoRA changed the output. Without arguments, a tiny random Stable Diffusion pipeline and a random LoRA (with a
text-encoder part) are written to a temporary directory; without --initial-peers, two servers are started on
127.0.0.1 (on threads of this process) serving it, with the U-Net's levels split between them.

Duration on a 2-core machine with the tiny pipeline: ~25 s (measured). Processes: without --initial-peers two
servers, each with its p2pd daemon; the client's p2pd; all stopped when it ends, also on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from swarm import AutoDistributedPipeline  # noqa: E402
from swarm.hub.tiny_diffusion import save_tiny_sd, save_tiny_unet_lora  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a Stable Diffusion directory (default: a tiny random one)")
    parser.add_argument("lora", nargs="?", help="its LoRA (default: a random one for the tiny pipeline)")
    parser.add_argument("--name", default="style", help="the adapter's name on the servers")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="servers already serving LORA as --name")
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--scale", type=float, default=0.8, help="cross_attention_kwargs' LoRA scale")
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none", help="the client's codec (none: output equal to local)")
    args = parser.parse_args()
    if (args.model is None) != (args.lora is None):
        parser.error("give both SD_DIR and LORA, or neither")

    with contextlib.ExitStack() as stack:
        model, lora = args.model, args.lora
        if model is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-sd-lora-")))
            model = save_tiny_sd(directory / "pipeline")
            lora = save_tiny_unet_lora(model, directory / "lora", seed=1, text_encoder=True)
            print(f"Wrote a tiny random Stable Diffusion pipeline and a LoRA of it to {directory}", flush=True)
        started = time.monotonic()
        peers = peers_or_local_swarm(stack, model, args.initial_peers, in_process=True,
                                     server_args=("--adapters", f"{args.name}={lora}"))
        print(f"Swarm ready (+{time.monotonic() - started:.1f} s)", flush=True)
        pipe = AutoDistributedPipeline.from_pretrained(model, initial_peers=peers, compression=args.compression)
        stack.callback(pipe.unet.shutdown)
        print(f"Adapters served for this U-Net: {sorted(pipe.unet.peft_config)}")
        local = DiffusionPipeline.from_pretrained(model)
        for pipeline in (pipe, local):
            pipeline.load_lora_weights(lora, adapter_name=args.name)
            pipeline.set_progress_bar_config(disable=True)

        def generate(pipeline) -> torch.Tensor:
            return pipeline(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                            cross_attention_kwargs={"scale": args.scale}, output_type="pt",
                            generator=torch.Generator().manual_seed(args.seed)).images

        started = time.monotonic()
        image = generate(pipe)
        print(f"Generated through the swarm in {time.monotonic() - started:.1f} s; now locally...", flush=True)
        reference = generate(local)
        local.disable_lora()
        without = generate(local)
        print(f"output shape: {tuple(image.shape)}")
        print(f"max difference from the local run: {(image - reference).abs().max().item():.3g}")
        print(f"max change the LoRA makes: {(reference - without).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
