"""Recorded performance history: (task features -> method -> measured outcome), in SQLite and as a JSONL dataset.

A corrupt or unreadable history never breaks a request: reading it logs a warning and yields nothing, and the
selector then falls back to the expert rule.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from swarm.acceleration.features import TaskFeatures
from swarm.utils.cache import cache_path

logger = logging.getLogger(__name__)

def default_path() -> Path:
    """``acceleration.sqlite`` in the cache directory (``$SWARM_CACHE`` or ``~/.cache/swarm``)."""
    return cache_path("acceleration.sqlite")


@dataclass(frozen=True)
class Outcome:
    ttft_s: float  # time to the first generated token (prefill + first step)
    total_s: float  # the whole request
    tokens_per_s: float  # generated tokens (all rows) per second of decoding after the first token
    bytes: int  # bytes this client sent and received
    quality: float | None = None  # greedy agreement with the exact path (1.0: identical), where measured

    @classmethod
    def timed(cls, started: float, first: float, finished: float, batch_size: int, new_tokens: int,
              bytes_: int) -> Outcome:
        """The outcome of a generation that started, had its first token and finished at these clock readings."""
        decode_tokens = (new_tokens - 1) * batch_size
        tokens_per_s = (decode_tokens / max(finished - first, 1e-6) if decode_tokens
                        else batch_size / max(first - started, 1e-6))
        return cls(ttft_s=first - started, total_s=finished - started, tokens_per_s=tokens_per_s, bytes=bytes_)

    def objective(self, name: str) -> float:
        """The value to minimize under objective ``name``."""
        if name == "latency":
            return self.total_s
        if name == "throughput":
            return 1.0 / max(self.tokens_per_s, 1e-9)
        if name == "cost":
            return float(self.bytes)
        raise ValueError(f"unknown objective {name!r}: latency, throughput or cost")


@dataclass(frozen=True)
class Record:
    task: str  # id of the task (features of the request, not of the run): the unit of train/test splits
    features: TaskFeatures
    method: str
    outcome: Outcome
    source: str = "local"  # "local" (this client), "collected" (the shipped dataset), "swarm" (DHT summaries)
    model: str = ""
    time: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "features": self.features.to_dict(), "method": self.method,
                           "outcome": asdict(self.outcome), "source": self.source, "model": self.model,
                           "time": self.time})

    @classmethod
    def from_json(cls, line: str) -> Record:
        data = json.loads(line)
        return cls(task=str(data["task"]), features=TaskFeatures.from_dict(data["features"]),
                   method=str(data["method"]), outcome=Outcome(**data["outcome"]), source=data.get("source", ""),
                   model=data.get("model", ""), time=float(data.get("time", 0.0)))


class History:
    """An SQLite table of records; safe to share between the threads of one client."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, time REAL, task TEXT, model TEXT, "
                   "method TEXT, source TEXT, record TEXT)")
        return db

    def add(self, record: Record) -> None:
        try:
            with self._connect() as db:
                db.execute("INSERT INTO records (time, task, model, method, source, record) VALUES (?, ?, ?, ?, ?, ?)",
                           (record.time or time.time(), record.task, record.model, record.method, record.source,
                            record.to_json()))
        except sqlite3.Error as e:  # a full disk or a corrupt file must not fail the request that was measured
            logger.warning(f"Could not record acceleration history in {self.path}: {e}")

    def records(self) -> list[Record]:
        """Every readable record; a corrupt file or row is skipped with a warning."""
        try:
            with self._connect() as db:
                lines = [row[0] for row in db.execute("SELECT record FROM records ORDER BY id")]
        except sqlite3.Error as e:
            logger.warning(f"Acceleration history {self.path} is unreadable ({e}); ignoring it")
            return []
        return _parse(lines, str(self.path))


def load_dataset(path: str | Path) -> list[Record]:
    """Records from a JSONL dataset (one record per line); unreadable lines are skipped with a warning."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning(f"Acceleration dataset {path} is unreadable ({e}); ignoring it")
        return []
    return _parse([line for line in lines if line.strip()], str(path))


def save_dataset(records: list[Record], path: str | Path) -> None:
    Path(path).write_text("".join(record.to_json() + "\n" for record in records))


def _parse(lines: list[str], where: str) -> list[Record]:
    records, bad = [], 0
    for line in lines:
        try:
            records.append(Record.from_json(line))
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        logger.warning(f"Skipped {bad} unreadable acceleration records in {where}")
    return records
