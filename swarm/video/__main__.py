"""``python -m swarm.video train DIR``: train the long-video models (swarm/video/recipe.py) and save them in DIR."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.video", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="generate MUGEN-like clips, train the VQ and the token transformer")
    train.add_argument("directory", help="where DIR/vq, DIR/transformer and DIR/stats.json go")
    train.add_argument("--clips", type=int, default=256)
    train.add_argument("--frames", type=int, default=16, help="frames per training clip (the training length)")
    train.add_argument("--size", type=int, default=32, help="pixels per side")
    train.add_argument("--vq-steps", type=int, default=400)
    train.add_argument("--steps", type=int, default=600, help="transformer training steps")
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from swarm.video.recipe import train_long_video_models  # (torch loads only once the arguments are fine)

    stats = train_long_video_models(args.directory, clips=args.clips, frames=args.frames, size=args.size,
                                    vq_steps=args.vq_steps, steps=args.steps, seed=args.seed, log=print)
    print(json.dumps({"vq_psnr": stats["vq"]["psnr"], "codebook_used": stats["vq"]["codebook_used"],
                      "transformer_loss": [stats["transformer"]["loss_first"], stats["transformer"]["loss_last"]],
                      "seconds": stats["seconds"]}))


if __name__ == "__main__":
    main()
