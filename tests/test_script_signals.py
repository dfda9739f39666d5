"""A script with a local swarm that gets SIGTERM (``timeout``) or SIGHUP (a closed terminal) stops every process it
started: its servers run in sessions of their own, so nothing else would reach them (swarm/local_swarm.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from swarm.local_swarm import LocalSwarm, Terminated

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, output: Path) -> T:
    """``condition()``'s first true value within ``timeout`` seconds; else fail, showing the script's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s:\n{output.read_text()}")


@pytest.mark.slow
def test_sigterm_stops_every_process_of_a_benchmark(tmp_path):
    output = tmp_path / "output.txt"
    with open(output, "w") as out:
        # --runs 300: the swarm's steps go on long enough to be interrupted; the local baseline's 3 take a second
        script = subprocess.Popen([sys.executable, str(BENCHMARKS / "diffusion.py"), "--tiny", "--runs", "300",
                                   "--local-runs", "3"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                  env={**os.environ, "TMPDIR": str(tmp_path)})  # its swarm's logs land here
    started: list[psutil.Process] = []
    try:
        wait_until(lambda: "servers: levels" in output.read_text() or script.poll() is not None, 240,
                   "'servers: levels' line", output)
        assert script.poll() is None, output.read_text()
        me = psutil.Process(script.pid)
        # The client's own p2pd (a child of the script) shows that it is generating through the servers now.
        wait_until(lambda: [p for p in me.children() if p.name() == "p2pd"], 60, "client p2pd", output)
        started = me.children(recursive=True)
        # Forks of the zygote (swarm/utils/preloaded.py), named after their module; the zygote itself goes too.
        servers = [p for p in started if p.name() == "swarm.server"]
        daemons = [p for p in started if p.name() == "p2pd"]
        assert len(servers) == 2 and len(daemons) == 3, [p.cmdline() for p in started]

        script.send_signal(signal.SIGTERM)
        assert script.wait(60) == 128 + signal.SIGTERM, output.read_text()
        assert "SIGTERM: stopping the 2 processes of the local swarm" in output.read_text()
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [p.cmdline() for p in alive]  # servers, their p2pd daemons and the client's p2pd
    finally:  # whatever the outcome, nothing outlives the test
        if script.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                started += psutil.Process(script.pid).children(recursive=True)
            script.kill()
        script.wait()
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminating_signals_raise_while_a_swarm_is_open(tmp_path, sig):
    """In-process, no processes started: the signal becomes ``Terminated`` (exit status 128 + signal) only while a
    LocalSwarm is open, nested swarms share the handler, and the previous handler is back afterwards."""
    inherited = signal.getsignal(sig)
    if inherited == signal.SIG_IGN:  # pytest run under nohup: an ignored SIGHUP stays ignored (the test below)
        signal.signal(sig, signal.SIG_DFL)
    try:
        before = signal.getsignal(sig)
        with LocalSwarm(tmp_path / "outer"):
            with pytest.raises(Terminated) as raised, LocalSwarm(tmp_path / "inner"):
                handler = signal.getsignal(sig)
                assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN)  # else the kill ends it
                os.kill(os.getpid(), sig)
                time.sleep(5)  # interrupted: the handler raises in the main thread
            assert raised.value.code == 128 + sig
            assert signal.getsignal(sig) is handler  # the outer swarm is still open
        assert signal.getsignal(sig) == before
    finally:
        signal.signal(sig, inherited)


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """Under ``nohup`` SIGHUP is ignored: a LocalSwarm must not turn it into an exit."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with LocalSwarm(tmp_path):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGHUP, previous)
