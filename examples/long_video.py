"""A video 4x longer than the transformer was trained on, generated through the swarm (TATS-style).

Trains (or loads from --models) the tiny models on MUGEN-like clips: a 3D VQ autoencoder and a Llama over its codes
(swarm/video/recipe.py); serves the transformer on two servers (or uses --initial-peers); generates a clip of
--length training lengths from a description with a sliding window (swarm/video/long_generation.py); writes it as a
GIF and a frame strip; and prints the figures: tokens/s through the swarm vs the same generation in a fresh local
process (equal output with --compression none), the window's cost (tokens re-sent per new frame), the VQ's
reconstruction error per frame, and how many windows of the clip a classifier (real clips vs shuffled frames)
judges in order, against the same windows shuffled.

    python examples/long_video.py --models /tmp/video-models --out clip.gif
Duration on a 2-core machine: training ~5 min (once; the default sizes), the rest ~1 min (measured).
Processes: without --initial-peers two servers, each with its p2pd daemon, and one local baseline process; the
client's p2pd; all stopped when it ends, also on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm.video.long_generation import generate_long_video  # noqa: E402
from swarm.video.mugen import MugenLikeClips, tokenize_text  # noqa: E402
from swarm.video.transformer import TokenLayout  # noqa: E402
from swarm.video.vqvae import load_vqvae  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="directory of the trained models (trained there first if missing; "
                                         "default: a temporary directory)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--description", help="what happens (words of mugen.VOCABULARY); default: a data clip's")
    parser.add_argument("--length", type=int, default=4, help="clip length in training lengths")
    parser.add_argument("--stride", type=int, help="frames of codes the window slides by (default: half of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none", help="the client's codec (none: output equal to local)")
    parser.add_argument("--out", default="long_video.gif", help="the clip as a GIF")
    parser.add_argument("--strip", help="a PNG strip of every 4th frame")
    # the training recipe's sizes (small ones for a quick run)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--vq-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--classifier-steps", type=int, default=200)
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    return parser.parse_args()


def generate_locally(args: argparse.Namespace, text_ids: list[int]) -> dict:
    """The same generation with the local transformers model, in this (fresh) process."""
    model = AutoModelForCausalLM.from_pretrained(Path(args.models) / "transformer").eval()
    frames = args.length * TokenLayout.of(model.config).frames
    generate_long_video(model, text_ids, 1, seed=args.seed)  # warm-up, as for the swarm client
    clip = generate_long_video(model, text_ids, frames, stride=args.stride, seed=args.seed)
    return {"codes": clip.codes.tolist(), "tokens_per_second": clip.tokens_per_second}


def write_gif(video: torch.Tensor, path: str, fps: int = 8, scale: int = 4) -> None:
    from PIL import Image

    frames = [Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy()).resize(
        (frame.shape[2] * scale, frame.shape[1] * scale), Image.NEAREST) for frame in video]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)


def write_strip(video: torch.Tensor, path: str, every: int = 4, scale: int = 2) -> None:
    from PIL import Image

    strip = torch.cat(list(video[::every]), dim=2)  # frames side by side
    image = Image.fromarray((strip.permute(1, 2, 0) * 255).round().byte().numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main() -> None:
    args = parse_args()
    if args.local_only:
        print(json.dumps(generate_locally(args, json.loads(args.description))))
        return
    with contextlib.ExitStack() as stack:
        if args.models is None:
            args.models = stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-long-video-"))
        models = Path(args.models)
        if not (models / "transformer" / "config.json").exists():
            from swarm.video.recipe import train_long_video_models

            print(f"Training the models into {models} ...", flush=True)
            train_long_video_models(models, clips=args.clips, frames=args.frames, size=args.size,
                                    vq_steps=args.vq_steps, steps=args.steps, seed=args.seed,
                                    log=lambda line: print(line, flush=True))
        stats = json.loads((models / "stats.json").read_text())
        data = MugenLikeClips(stats["clips"], frames=stats["frames"], size=stats["size"], seed=stats["seed"])
        text = args.description or data[len(data) - 1]["text"]
        text_ids = tokenize_text(text)
        layout = TokenLayout(**stats["layout"])
        frames = args.length * layout.frames
        print(f"Description: {text!r}; {frames} frames of codes ({args.length}x the training length)", flush=True)

        # the baseline first, in a fresh process of its own (a live swarm client slows torch work in its process)
        baseline = subprocess.run([sys.executable, __file__, "--local-only", "--models", str(models),
                                   "--description", json.dumps(text_ids), "--length", str(args.length),
                                   "--seed", str(args.seed)] + (["--stride", str(args.stride)] if args.stride else []),
                                  capture_output=True, text=True, check=True)
        local = json.loads(baseline.stdout.strip().splitlines()[-1])

        from swarm import AutoDistributedModelForCausalLM
        from swarm.local_swarm import peers_or_local_swarm

        peers = peers_or_local_swarm(stack, models / "transformer", args.initial_peers)
        model = AutoDistributedModelForCausalLM.from_pretrained(models / "transformer", initial_peers=peers,
                                                                compression=args.compression)
        stack.callback(model.shutdown)
        generate_long_video(model, text_ids, 1, seed=args.seed)  # warm-up: routes, connections
        began = time.perf_counter()
        clip = generate_long_video(model, text_ids, frames, stride=args.stride, seed=args.seed)
        print(f"Generated {clip.tokens_generated} tokens in {time.perf_counter() - began:.1f} s", flush=True)

        vq = load_vqvae(models / "vq")
        with torch.no_grad():
            video = vq.decode(clip.codes[None])[0]
        write_gif(video, args.out)
        if args.strip:
            write_strip(video, args.strip)
        print(f"Wrote {args.out} ({video.shape[0]} frames of {video.shape[2]}x{video.shape[3]})")

        from swarm.video.quality import in_order_share, shuffle_frames, train_order_classifier

        classifier, classifier_stats = train_order_classifier(data, steps=args.classifier_steps, seed=args.seed)
        window = stats["frames"]
        shuffled = torch.cat([shuffle_frames(video[i: i + window], torch.Generator().manual_seed(i))
                              for i in range(0, video.shape[0] - window + 1, window)])
        mse = stats["vq"]["frame_mse"]
        figures = {
            "equal_to_local": clip.codes.tolist() == local["codes"],
            "swarm_tokens_per_second": round(clip.tokens_per_second, 1),
            "local_tokens_per_second": round(local["tokens_per_second"], 1),
            "swarm_vs_local": round(clip.tokens_per_second / local["tokens_per_second"], 2),
            "slides": clip.slides,
            "tokens_resent_per_new_frame": round(clip.resent_per_new_frame, 1),
            "tokens_per_frame": layout.tokens_per_frame,
            "tokens_sent_per_token": round(clip.tokens_sent / clip.tokens_generated, 2),
            "vq_psnr_db": round(stats["vq"]["psnr"], 2),
            "vq_frame_mse": f"{min(mse):.4f}..{max(mse):.4f}",
            "classifier_accuracy": round(classifier_stats["accuracy"], 3),
            "generated_windows_in_order": round(in_order_share(classifier, video, window), 3),
            "shuffled_windows_in_order": round(in_order_share(classifier, shuffled, window, window), 3),
        }
        for name, value in figures.items():
            print(f"{name}={value}")


if __name__ == "__main__":
    main()
