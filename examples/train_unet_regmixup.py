"""Training a conditioning adapter through a served U-Net, with a RegMixup term: the client learns a small adapter on
the text encoder's output while the U-Net's blocks run (frozen) on the swarm's servers, which also compute their
part of the backward.

    python examples/train_unet_regmixup.py [--model SD_PIPELINE_DIR --initial-peers MADDR] [--steps 12]

Without --model, a tiny random Stable Diffusion pipeline is saved in a temporary directory; without
--initial-peers, a local swarm of two servers (the U-Net's levels split in half: 0:1 and 1:3 for the tiny one) is
started on threads of this process for the run.

The adapter adds a learned offset to each token's encoder state and a learned linear map of it (zero at the start:
training begins from the plain prompt). The loss is the denoising loss of two training images' latents (noise
prediction at a fixed timestep and noises, so that the printed losses compare), plus RegMixup's extra term (Pinto
et al., 2022): the same loss on a mixup of the two noisy latents, whose target is the same mixup of their noises.
Both U-Net calls run before one backward. (Textual inversion, one new token's embedding, trains the same way, but
through the tiny random CLIP its loss moves by well under 1%.)

Duration on a 2-core machine, with the local swarm and the default 12 steps: 27 s (measured; loss 1.62 -> 1.15).
Processes: the client's p2pd, and with the local swarm the servers' two; all stopped when it ends, also on Ctrl-C,
SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from swarm import AutoDistributedPipeline  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402

PROMPT = "a picture of a pattern"
MIXUP_WEIGHT = 0.5  # RegMixup's eta: the mixup term's weight beside the clean loss
MIXUP_ALPHA = 1.0  # each mixing coefficient is drawn from Beta(alpha, alpha)
TIMESTEP = 300


class ConditioningAdapter(nn.Module):
    """``states + offset + states @ weight``, per token position: zero at the start."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(tokens, width))
        self.weight = nn.Parameter(torch.zeros(width, width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states + self.offset + states @ self.weight


def training_images(size: int) -> torch.Tensor:
    """Two synthetic RGB images in [-1, 1]: a checkerboard and a diagonal gradient."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((x // 8 + y // 8) % 2).float() * 2 - 1
    gradient = (x + y).float() / (2 * size - 2) * 2 - 1
    return torch.stack([torch.stack([checker, gradient, -checker]), torch.stack([gradient, checker, gradient])])


def local_swarm(stack: contextlib.ExitStack, model: Path) -> list[str]:
    """Two servers splitting the U-Net's levels in half, on threads of this process (no second Python start-up)."""
    from swarm.hub.tiny_diffusion import unet_levels

    levels = unet_levels(model)
    swarm = stack.enter_context(LocalSwarm())
    first = swarm.start_server_in_process(model, f"0:{levels // 2}", [])
    swarm.start_server_in_process(model, f"{levels // 2}:{levels}", [first.maddr])
    return [first.maddr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Stable Diffusion pipeline directory (default: a tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    args = parser.parse_args()
    if args.initial_peers and not args.model:
        parser.error("--initial-peers needs --model: the pipeline directory those servers serve")
    torch.manual_seed(0)

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            from swarm.hub.tiny_diffusion import save_tiny_sd

            model = save_tiny_sd(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny-sd")
        peers = args.initial_peers or local_swarm(stack, Path(model))
        pipe = AutoDistributedPipeline.from_pretrained(model, initial_peers=peers)
        stack.callback(pipe.unet.shutdown)
        vae, text_encoder, tokenizer, scheduler = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
        for frozen in (vae, text_encoder):
            frozen.requires_grad_(False)

        ids = tokenizer([PROMPT] * 2, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            states = text_encoder(ids)[0]
            latents = vae.encode(training_images(args.size)).latent_dist.mean * vae.config.scaling_factor
        adapter = ConditioningAdapter(*states.shape[1:])
        optimizer = torch.optim.Adam(adapter.parameters(), lr=args.lr)

        # a fixed batch (noises, coefficients), so that the losses printed compare from step to step
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.tensor([TIMESTEP, TIMESTEP])  # one timestep: mixing noisy latents mixes their noises
        noisy = scheduler.add_noise(latents, noise, timesteps)
        lam = torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA).sample((2, 1, 1, 1))
        partner = torch.tensor([1, 0])  # each image mixed with the other
        mixed = lam * noisy + (1 - lam) * noisy[partner]
        mixed_target = lam * noise + (1 - lam) * noise[partner]

        losses = []
        for step in range(args.steps):
            conditioning = adapter(states)
            clean = F.mse_loss(pipe.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample, noise)
            mixup = F.mse_loss(pipe.unet(mixed, timesteps, encoder_hidden_states=conditioning).sample,
                               mixed_target)
            loss = clean + MIXUP_WEIGHT * mixup
            optimizer.zero_grad()
            loss.backward()  # through both U-Net calls' servers, into the adapter
            optimizer.step()
            losses.append(loss.item())
            print(f"step {step}: loss {loss.item():.5f} (clean {clean.item():.5f}, mixup {mixup.item():.5f})",
                  flush=True)
        print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")


if __name__ == "__main__":
    main()
