"""A client process for tests across emulated hosts: ``python tests/host_client.py MODEL PEER...`` loads the model
with those initial peers, then for each line read from stdin (a JSON list of token ids) prints one line: the
greedy continuation's tokens as JSON, or ``error: ...``. One model object (and its routes) serves every line."""

from __future__ import annotations

import json
import sys

import torch

from swarm.client import AutoDistributedModelForCausalLM


def main() -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            try:
                tokens = model.generate(torch.tensor([json.loads(line)]), max_new_tokens=6, do_sample=False,
                                        eos_token_id=None)
                print(json.dumps(tokens[0].tolist()), flush=True)
            except Exception as e:  # the test reads it and fails with it
                print(f"error: {type(e).__name__}: {e}".replace("\n", " "), flush=True)
    finally:
        model.shutdown()


if __name__ == "__main__":
    main()
