"""Acceleration selection on the real history: held-out regret of the learner vs random and the expert rule.

Reads the dataset collected by collect_acceleration_history.py (split by task: every run of a held-out task is
unseen), and prints for each objective and learner kind: mean regret against the oracle (the best method
measured for the task), selection accuracy, floor violations and the confidence's calibration error; then how
well the learner knows what it does not know: trained on the small model only, how its novelty and confidence
separate SmolLM2's tasks (a model 30x larger) from held-out small-model tasks, and what the fallback saves.

    python benchmarks/acceleration.py [--dataset benchmarks/data/acceleration_history.jsonl]

The expert rule: no compression on a LAN (RTT < 10 ms), else 8-bit activations between servers with float16 ends
(the swarm's default); float weights; no local blocks; no chunked prefill; pushes on.

Duration on a 2-core machine: 28 s (measured). Processes: none (it reads the dataset).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from swarm.acceleration import load_dataset
from swarm.acceleration.evaluation import cross_validate, novelty_detection
from swarm.acceleration.learner import TaskTable, oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=Path(__file__).parent / "data" / "acceleration_history.jsonl")
    parser.add_argument("--quality-floor", type=float, default=0.9)
    parser.add_argument("--kinds", nargs="*", default=["knn", "gbt"])
    args = parser.parse_args()
    records = load_dataset(args.dataset)
    table = TaskTable.from_records(records)
    print(f"{len(records)} runs, {len(table)} tasks, methods per task: "
          f"{Counter(len(o) for o in table.outcomes).most_common()}")
    for objective in ("latency", "throughput", "cost"):
        best = Counter(oracle(o, objective, args.quality_floor) for o in table.outcomes)
        print(f"\n== objective: {objective} (quality floor {args.quality_floor}); oracle's methods: "
              f"{dict(best.most_common())}")
        for kind in args.kinds:
            started = time.perf_counter()
            evaluation = cross_validate(table, kind, objective, args.quality_floor)
            print(f"{kind:>4}: {evaluation.summary()}  [{time.perf_counter() - started:.1f} s]")
    print("\n== knowing when it does not know: trained on the small model, SmolLM2's tasks are the unusual ones ==")
    unusual = [f.model_params > 1e8 for f in table.features]
    if any(unusual) and not all(unusual):
        for kind in args.kinds:
            result = novelty_detection(table, unusual, kind, "latency", args.quality_floor)
            print(f"{kind:>4}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    else:
        print("(the dataset has only one model)")


if __name__ == "__main__":
    sys.exit(main())
