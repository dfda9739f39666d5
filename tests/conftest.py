"""Fixtures: tiny models saved once per session, and real swarm processes on 127.0.0.1 stopped by PID.

Hermetic: each run gets a fresh, empty cache directory (``SWARM_CACHE``, inherited by every process a test starts,
and the hub caches) that is removed at the end, so nothing an earlier run left in ``~/.cache`` helps or hurts, and
the embedded model is converted from its wheel once per run. pytest-xdist's workers (``make test`` runs two) share
that directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# One torch thread per process (inherited by every process the tests start), unless the developer chose: `make test`
# runs three workers on two cores, each with servers and clients of its own, and two OpenMP threads per process then
# contend for the cores (suite CPU 893 -> 826 s, wall 470 -> 431 s). Set before torch is imported (below).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Likewise one thread for ezkl's provers (rayon): tests/test_zk.py 16.9 -> 15.1 CPU-s.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
# A run started in the background by a non-interactive shell (`make test &`) has SIGINT ignored, and every process
# the tests start would inherit that: the Ctrl-C tests would then test nothing but the shell. A Python handler is
# reset to the default in the processes we exec, so this gives them the SIGINT a terminal user's processes have.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# A developer's own swarm or log level must not leak into the tests' servers and clients.
for name in ("SWARM_INITIAL_PEERS", "SWARM_LOG_LEVEL"):
    os.environ.pop(name, None)
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("SWARM_TEST_RUN_CACHE"):
    # A pytest-xdist worker: it shares the run's cache that its controller made (and removes at the end).
    RUN_CACHE = Path(os.environ["SWARM_TEST_RUN_CACHE"])
else:
    RUN_CACHE = Path(tempfile.mkdtemp(prefix="swarm-test-cache-"))
    os.environ["SWARM_TEST_RUN_CACHE"] = str(RUN_CACHE)
    atexit.register(shutil.rmtree, RUN_CACHE, ignore_errors=True)
os.environ["SWARM_CACHE"] = str(RUN_CACHE)
os.environ["HF_HOME"] = str(RUN_CACHE / "huggingface")  # offline anyway; nothing read from or left in ~/.cache

sys.path.insert(0, str(Path(__file__).parent))

from swarm.local_swarm import LocalSwarm, Terminated  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` run first, the longest (``slow(seconds=...)``, the whole file's time as
    measured) first of all. Under pytest-xdist (``make test`` runs two workers, each taking whole files, in this
    order: ``--no-loadscope-reorder``) the workers then end on short files, instead of one running the fuzzer alone
    for minutes at the end while the other idles."""
    weight: dict = {}
    for item in items:
        for marker in item.iter_markers("slow"):
            weight[item.path] = max(weight.get(item.path, 0), marker.kwargs.get("seconds", 1))
    items.sort(key=lambda item: -weight.get(item.path, 0))  # stable: the order within files stays


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The zygote that forked this process's swarm processes (swarm/utils/preloaded.py) is ended with the run."""
    from swarm.utils import preloaded

    preloaded.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """SIGTERM or SIGHUP (e.g. CI's timeout) reaches a test as ``Terminated`` while a local swarm is open, which
    stops that swarm's processes: the run stops there too instead of going on with the next test."""
    yield
    if call.excinfo is not None and call.excinfo.errisinstance(Terminated):
        item.session.shouldstop = f"{call.excinfo.value!r}: stopping the run"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded SmolLM2, converted from the wheel's GGUF into this run's empty cache (once per run, ~25 s):
    a broken conversion (a missing dependency, say) fails the suite instead of hiding behind a warm cache."""
    from swarm.hub.embedded import embedded_dir, prepare_embedded_model

    # The run's cache starts empty (made above), so the conversion happens in this run: in whichever worker asks
    # first, while another waits on its lock. Alone, no one can have converted it before this fixture.
    assert embedded_dir().is_relative_to(RUN_CACHE), "the embedded model must go into this run's fresh cache"
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        assert not embedded_dir().exists(), "the run's cache should start empty"
    path = prepare_embedded_model()
    assert path == embedded_dir() and (path / "config.json").exists() and (path / "tokenizer.json").exists()
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """tiny_model("llama") -> directory of a saved tiny random model (made once per session)."""
    from tiny_models import save_tiny_model  # here, not at the top: pytest-xdist's controller needs no torch

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
