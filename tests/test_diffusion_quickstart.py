"""The offline diffusion quick start: ``python -m swarm.hub.tiny_diffusion KIND DIR`` writes a tiny pipeline and
prints the server commands and the client code; run as printed, they generate, and what the swarm generates equals
the local pipeline's output. diffusers has nothing to warn about along the way."""

from __future__ import annotations

import logging
import shlex

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from swarm import AutoDistributedPipeline
from swarm.hub.tiny_diffusion import CLIENT_CODE_FOLLOWS
from swarm.local_swarm import SERVER_READY, start_process
from swarm.utils import preloaded

pytestmark = pytest.mark.slow  # each quick start is a tiny pipeline, two servers and a client script
OUTPUT = {"sd": "tiny-sd.png", "video": "tiny-video.gif"}


class Records(logging.Handler):
    """Every record diffusers logs (its library logger does not propagate to the root, so caplog misses them)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_log():
    handler = Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("kind", ["sd", "video"])
def test_quick_start_as_printed(kind, launcher, tmp_path, monkeypatch, diffusers_log):
    directory = tmp_path / f"tiny-{kind}"
    result = preloaded.run(["-m", "swarm.hub.tiny_diffusion", kind, str(directory)], timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout
    assert "Expected types" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no partial directory left behind

    commands = [shlex.split(line) for line in printed.splitlines() if line.lstrip().startswith("python -m swarm")]
    assert [command[command.index("--blocks") + 1] for command in commands] == ["0:1", "1:3"], printed
    servers = []
    try:
        for i, command in enumerate(commands):  # "python" is this interpreter; MADDR the first server's address
            args = [arg.replace("MADDR", servers[0].maddr) if servers else arg for arg in command[1:]]
            servers.append(start_process(launcher, args, SERVER_READY, f"quick-start-{kind}-{i}"))

        code = printed.split(CLIENT_CODE_FOLLOWS, 1)[1].replace("MADDR", servers[0].maddr)
        monkeypatch.chdir(tmp_path)  # the code saves its image or video in the current directory
        exec(compile(code, f"<quick start {kind}>", "exec"), {})
        with Image.open(tmp_path / OUTPUT[kind]) as output:
            assert output.size == (128, 128)
            assert getattr(output, "n_frames", 1) == (8 if kind == "video" else 1)

        remote = AutoDistributedPipeline.from_pretrained(directory, initial_peers=[servers[0].maddr],
                                                         compression="none")
        local = DiffusionPipeline.from_pretrained(directory)
        try:
            extra = {"num_frames": 3} if kind == "video" else {}
            outputs = [pipe("a lighthouse at dawn", num_inference_steps=3, height=64, width=64, output_type="np",
                            generator=torch.Generator().manual_seed(0), **extra)
                       for pipe in (remote, local)]
        finally:
            remote.unet.shutdown()
        field = "frames" if kind == "video" else "images"
        swarm_made, local_made = (np.asarray(getattr(output, field)) for output in outputs)
        assert swarm_made.shape == local_made.shape and (swarm_made == local_made).all()
    finally:
        for server in servers:
            server.stop()
    assert not [message for message in diffusers_log if "Expected types" in message], diffusers_log


def test_quick_start_refuses_a_directory_in_use(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = preloaded.run(["-m", "swarm.hub.tiny_diffusion", "sd", str(tmp_path)], timeout=60)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "notes.txt").read_text() == "mine"
