"""Fixtures: tiny models saved once per session, and real swarm processes on 127.0.0.1 stopped by PID."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model  # noqa: E402

from swarm.utils.local_swarm import LocalSwarm  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """tiny_model("llama") -> directory of a saved tiny random model (made once per session)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, models_dir / f"tiny-{family}")
        return made[family]

    return get


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """A LocalSwarm whose processes live for one test module."""
    with LocalSwarm(tmp_path_factory.mktemp("procs")) as swarm:
        yield swarm
