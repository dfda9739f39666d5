"""Coverage and server counts sampled at every refresh into SQLite, so the page survives restarts with its chart."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from swarm.health.state import SwarmState


class History:
    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from the event loop and request threads
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("""CREATE TABLE IF NOT EXISTS samples (
            time REAL NOT NULL, model_id TEXT NOT NULL, servers_online INTEGER NOT NULL,
            blocks_covered INTEGER NOT NULL, num_blocks INTEGER NOT NULL, healthy INTEGER NOT NULL)""")
        self._db.execute("CREATE INDEX IF NOT EXISTS samples_by_time ON samples (time)")
        self._db.commit()

    def record(self, state: SwarmState) -> None:
        rows = [(state.updated_at, m.model_id, sum(s.reachable is True for s in m.servers),
                 m.num_blocks - m.missing_blocks, m.num_blocks, int(m.healthy)) for m in state.models]
        with self._lock:
            self._db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.commit()

    def recent(self, hours: float = 6.0) -> dict[str, list[tuple[float, int, int, int]]]:
        """Per model: (time, servers online, blocks covered, blocks) over the last ``hours``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id, time, servers_online, blocks_covered, num_blocks FROM samples "
                "WHERE time >= ? ORDER BY time", (time.time() - hours * 3600,)).fetchall()
        series: dict[str, list[tuple[float, int, int, int]]] = {}
        for model_id, *sample in rows:
            series.setdefault(model_id, []).append(tuple(sample))
        return series

    def close(self) -> None:
        with self._lock:
            self._db.close()
