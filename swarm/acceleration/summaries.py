"""Aggregated acceleration history in the DHT, so that a new node starts from the swarm's history, not from nothing.

A server started with ``--acceleration-history FILE`` (its operator's collected history) announces a summary of it
with its span: per task, the features once and each method's mean outcome. The record is signed and stored under
the server's own peer id like every record (swarm/dht/validation.py), so one server cannot overwrite another's.
A client whose own history is thin learns from these summaries too (they are marked ``source="swarm"``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.acceleration.features import TaskFeatures
from swarm.acceleration.history import History, Outcome, Record, load_dataset
from swarm.acceleration.learner import TaskTable

logger = logging.getLogger(__name__)

MAX_TASKS = 64  # tasks per summary: keeps a DHT value in the tens of kilobytes


def summary_key(model_id: str) -> str:
    return f"{model_id}.acceleration"


def read_history(path: str | Path) -> list[Record]:
    """Records from a JSONL dataset or an SQLite history file."""
    path = Path(path)
    return load_dataset(path) if path.suffix in (".jsonl", ".json") else History(path).records()


def summarize(records: list[Record], max_tasks: int = MAX_TASKS) -> list[dict]:
    """Per task (the most recent ``max_tasks``): its features and each method's mean outcome and run count."""
    table = TaskTable.from_records(records)
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        counts[record.task, record.method] = counts.get((record.task, record.method), 0) + 1
    summary = []
    for task, features, outcomes in list(zip(table.tasks, table.features, table.outcomes, strict=True))[-max_tasks:]:
        methods = {method: {**asdict(outcome), "runs": counts.get((task, method), 1)}
                   for method, outcome in outcomes.items()}
        summary.append({"features": features.to_dict(), "methods": methods})
    return summary


class HistoryAnnouncer:
    """What ``--acceleration-history FILE`` adds to a server's announcements (``ServerConfig.announcers``): the
    file's summary, read once (it is the operator's collected file), published with every announcement."""

    def __init__(self, path: str | Path):
        self.path = path
        self.summary: list[dict] | None = None

    async def __call__(self, node: DHTNode, model_id: str, expiration: float) -> None:
        import asyncio

        if self.summary is None:
            self.summary = summarize(await asyncio.to_thread(read_history, self.path))
            logger.info(f"Announcing an acceleration summary of {len(self.summary)} tasks")
        if self.summary:
            await publish(node, model_id, self.summary, expiration)


async def publish(node: DHTNode, model_id: str, summary: list[dict], expiration: float) -> bool:
    return await node.store(summary_key(model_id), summary, get_dht_time() + expiration,
                            subkey=node.peer_id.to_base58())


async def fetch(node: DHTNode, model_id: str) -> list[Record]:
    """Every server's summary as records (``source="swarm"``); malformed entries are skipped."""
    found = await node.get(summary_key(model_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for peer, item in found.value.items():
        tasks = getattr(item, "value", None)
        if not isinstance(peer, str) or not isinstance(tasks, list):
            continue
        for n, task in enumerate(tasks[:MAX_TASKS]):
            try:
                features = TaskFeatures.from_dict(task["features"])
                for method, outcome in task["methods"].items():
                    fields = {name: outcome[name] for name in ("ttft_s", "total_s", "tokens_per_s", "bytes")}
                    records.append(Record(f"swarm-{peer[-8:]}-{n}", features, str(method),
                                          Outcome(**fields, quality=outcome.get("quality")), source="swarm"))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.debug(f"Skipped a malformed acceleration summary from {peer[-8:]}")
    return records
