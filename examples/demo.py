"""`make demo`: a local swarm on the embedded SmolLM2-135M-Instruct answers a question.

Starts a bootstrap node and two servers (blocks 0:15 and 15:30) on 127.0.0.1, asks the client a question through
them, prints the answer, the chain of servers and the speed, and stops every process it started.

Duration on a 2-core machine: 25 s (measured; 49 s on the first run, which converts the embedded model into the
cache). Processes: a bootstrap node and two servers, each with its p2pd daemon, and the client's p2pd; all stopped
when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM, load_tokenizer  # noqa: E402
from swarm.hub.embedded import prepare_embedded_model  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    print(f"[1/4] Preparing the embedded model {EMBEDDED_MODEL} (converted once, then cached)...", flush=True)
    prepare_embedded_model()
    with LocalSwarm() as swarm:
        print(f"[2/4] Starting a bootstrap node and two servers on 127.0.0.1 (logs in {swarm.directory})...",
              flush=True)
        bootstrap = swarm.start_dht()
        print(f"      bootstrap node: {bootstrap.maddr}", flush=True)
        servers = [swarm.start_server(None, blocks, [bootstrap.maddr], wait=False) for blocks in ("0:15", "15:30")]
        for server, blocks in zip(servers, ("0:15", "15:30"), strict=True):
            started = time.monotonic()
            server.wait_ready()
            print(f"      server for blocks {blocks} is online as {server.peer_id} "
                  f"(+{time.monotonic() - started:.1f} s)", flush=True)

        print("[3/4] Connecting the client (embeddings and LM head stay local)...", flush=True)
        tokenizer = load_tokenizer(EMBEDDED_MODEL)
        model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[bootstrap.maddr])
        try:
            chat = [{"role": "user", "content": args.question}]
            input_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            print(f"[4/4] Asking: {args.question!r}", flush=True)
            started = time.perf_counter()
            output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - started
            new_tokens = output.shape[1] - input_ids.shape[1]
            answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
            print()
            print(f"Answer: {answer}")
            print("Chain:  " + " -> ".join(f"{span.peer_id[-8:]} (blocks {span.start}:{span.end})"
                                            for span in model.route()))
            print(f"Speed:  {new_tokens} tokens in {elapsed:.2f} s = {new_tokens / elapsed:.1f} tokens/s "
                  f"(prompt of {input_ids.shape[1]} tokens included)")
        finally:
            model.shutdown()
        print("\nStopping the swarm...", flush=True)


if __name__ == "__main__":
    main()
