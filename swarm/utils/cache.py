"""Where the project keeps state on disk: one cache directory, ``$SWARM_CACHE`` or ``~/.cache/swarm``.

Everything the project writes without being given a path (the converted embedded model, measured throughputs, the
acceleration history, the settlement ledger, the health page's history) lives under it, never in the current
directory; tests point ``SWARM_CACHE`` at a fresh directory per run.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache directory (read from the environment at each call, so a test or a CLI can redirect it)."""
    configured = os.environ.get("SWARM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "swarm"


def cache_path(*parts: str) -> Path:
    """A path under the cache directory, e.g. ``cache_path("ledger.sqlite")``."""
    return cache_root().joinpath(*parts)
