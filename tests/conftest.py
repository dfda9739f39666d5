"""Fixtures that start real swarm processes on 127.0.0.1 and end them by PID (process group) at teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model  # noqa: E402

READY_MARKER = "Join this swarm with: --initial-peers "
DHT_READY_MARKER = "--initial-peers "


class SwarmProcess:
    """A ``python -m swarm.server`` / ``swarm.dht`` process with its log file."""

    def __init__(self, args: list[str], log_path: Path, ready_marker: str):
        self.args, self.log_path, self.ready_marker = args, log_path, ready_marker
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A new session: teardown signals the whole group, p2pd daemons included.
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.maddr: str | None = None

    def wait_ready(self, timeout: float = 180) -> SwarmProcess:
        if self.maddr is None:
            self.maddr = self.wait_for(self.ready_marker, timeout)
        return self

    def wait_for(self, marker: str, timeout: float) -> str:
        """The rest of the first log line containing ``marker``'s first word after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if marker in line:
                    return line.split(marker, 1)[1].split()[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.args} not ready in {timeout} s:\n{self.log_path.read_text()}")

    @property
    def peer_id(self) -> str:
        return self.maddr.rsplit("/p2p/", 1)[1]

    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server alone: it announces offline through its p2pd
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # whatever is left of the group (p2pd daemons)
        self.proc.wait()
        self.log.close()


class SwarmLauncher:
    def __init__(self, directory: Path):
        self.directory, self.processes = directory, []

    def start_dht(self) -> SwarmProcess:
        return self._start(["-m", "swarm.dht", "--host", "127.0.0.1"], DHT_READY_MARKER).wait_ready()

    def start_server(self, model: str | None, blocks: str, initial_peers: list[str], *extra: str,
                     wait: bool = True) -> SwarmProcess:
        args = ["-m", "swarm.server"] + ([str(model)] if model else []) + ["--blocks", blocks, "--host", "127.0.0.1"]
        if initial_peers:
            args += ["--initial-peers", *initial_peers]
        process = self._start(args + list(extra), READY_MARKER)
        return process.wait_ready() if wait else process

    def _start(self, args: list[str], marker: str) -> SwarmProcess:
        process = SwarmProcess(args, self.directory / f"proc{len(self.processes)}.log", marker)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


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
    launcher = SwarmLauncher(tmp_path_factory.mktemp("procs"))
    yield launcher
    launcher.stop_all()
