"""Chaos with restarts: two replicas per span, and in every generation the server in use for a random span is
SIGKILLed at a random step and restarted at once under its identity (SmolLM2-135M, float32, compression none).

Prints, per run, whether the generation finished and equals local greedy decoding, and at the end
``finished=N/RUNS identical=N/RUNS``. Before bans healed, restarted servers stayed banned and most runs failed with
``MissingBlocksError`` while all four servers were up.

Duration on a 2-core machine: about 4 minutes with ``--runs 20``. Processes: a bootstrap node, four servers (one more
per restart, the killed one gone), each with its p2pd daemon, and the client's; all stopped when it ends, also on
Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, StoppingCriteria  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, resolve_model  # noqa: E402
from swarm.blocks.span import load_config  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402


class KillAt(StoppingCriteria):
    def __init__(self, length: int, action):
        self.length, self.action, self.fired = length, action, False

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] >= self.length and not self.fired:
            self.fired = True
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    source = resolve_model(args.model)
    num_blocks = load_config(source).num_hidden_layers
    spans = [f"0:{num_blocks // 2}", f"{num_blocks // 2}:{num_blocks}"]
    local = AutoModelForCausalLM.from_pretrained(source.config_path, dtype=torch.float32).eval()
    keys = Path(tempfile.mkdtemp(prefix="swarm-chaos-"))
    finished = identical = 0
    with LocalSwarm() as launcher:
        peers = [launcher.start_dht().maddr]
        names = [(span, replica) for span in range(2) for replica in range(2)]

        def start(name: tuple[int, int]):
            return launcher.start_server(args.model, spans[name[0]], peers, "--identity",
                                         str(keys / f"{name[0]}-{name[1]}.key"), wait=False)

        servers = {name: start(name) for name in names}
        for process in servers.values():
            process.wait_ready()
        by_peer = {process.peer_id: name for name, process in servers.items()}
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers,
                                                                compression="none", request_timeout=20.0)
        for run in range(args.runs):
            span, step = rng.randrange(2), rng.randrange(1, args.new_tokens - 1)
            ids = torch.randint(100, local.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(run))
            killed = []

            def kill_and_restart(span: int = span, killed: list = killed) -> None:
                name = by_peer[model.get_remote().active_session.chain[span].peer_id]
                servers[name].signal(signal.SIGKILL)
                servers[name] = start(name)
                killed.append(name)

            started = time.monotonic()
            try:
                with model.inference_session(max_length=64):
                    out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                         stopping_criteria=[KillAt(ids.shape[1] + step, kill_and_restart)])
                finished += 1
                same = torch.equal(out, local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                                       eos_token_id=None))
                identical += same
                result = "identical" if same else "DIFFERENT"
            except Exception as e:  # a failed run is what this measures
                result = f"FAILED: {type(e).__name__}: {str(e)[:160]}"
            print(f"run {run + 1}: killed {killed} at step {step}: {result} ({time.monotonic() - started:.1f} s)",
                  flush=True)
            for name in killed:
                servers[name].wait_ready()  # all four up again before the next run
        model.shutdown()
    print(f"finished={finished}/{args.runs} identical={identical}/{args.runs}")


if __name__ == "__main__":
    main()
