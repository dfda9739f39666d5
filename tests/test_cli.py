"""The command lines as a new user meets them: fast --help, Petals' spellings, and mistakes that explain themselves
in one line (real CLIs as subprocesses, a real swarm on 127.0.0.1, the real client)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

import swarm
from swarm.local_swarm import SERVER_READY, SwarmProcess, start_process

REPO = Path(__file__).parent.parent
ENTRY_POINTS = {  # console script -> module run by python -m
    "swarm-server": "swarm.server",
    "swarm-dht": "swarm.dht",
    "swarm-health": "swarm.health",
    "swarm-api": "swarm.api",
    "swarm-chat": "swarm.chat",
}
MODULES = list(ENTRY_POINTS.values())
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWJmkQ5Kq1uxsqbyHhkZ6rNeYdhBJVCxoHfn1iyQYdcXiE"  # well-formed, nobody
HEAVY = ("torch", "transformers", "diffusers", "hivemind", "uvicorn")


def clean_env(**extra: str) -> dict[str, str]:
    """The test run's environment without the variables these tests are about (a developer may have set them)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("SWARM_INITIAL_PEERS", "SWARM_LOG_LEVEL")}
    return {**env, **extra}


def run_cli(module: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m module args``, run in an empty directory, waited for (subprocess.run kills it by PID on a
    timeout); for commands that end by themselves."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), cwd=Path(os.environ["SWARM_CACHE"]))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    """The command failed with exactly one line on stderr, ``error: ...`` containing ``fragments``; returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and (code is None or result.returncode == code), (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- --help: fast, light, named and grouped as people expect


def test_help_answers_fast_without_heavy_imports():
    for module in MODULES:
        started = time.monotonic()
        result = run_cli(module, "--help")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:200]
        assert "--log-level" in result.stdout and "SWARM_LOG_LEVEL" in result.stdout
        assert elapsed < 3, f"{module} --help took {elapsed:.1f} s"
        # What the entry point imports before parsing: nothing heavy (python -m runs it as __main__, like this).
        probe = (f"import runpy, sys; sys.argv = ['x', '--help']\n"
                 f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                 f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))")
        imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                                  env=clean_env()).stdout.strip().splitlines()[-1]
        assert imported == "[]", f"{module} --help imports {imported}"


def test_import_swarm_is_lazy_and_keeps_its_names():
    probe = "import sys, swarm; from swarm import EMBEDDED_MODEL, load_tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env=clean_env()).stdout.split()
    assert out == ["False"]  # the heavy names load on first use (here, in this process, they are)
    assert sorted(swarm.__all__) == sorted(swarm._EXPORTS)
    assert all(getattr(swarm, name) is not None for name in swarm.__all__)
    from swarm import AutoDistributedModelForCausalLM
    from swarm.client.model import AutoDistributedModelForCausalLM as defined

    assert AutoDistributedModelForCausalLM is defined
    with pytest.raises(AttributeError):
        swarm.no_such_name  # noqa: B018


def test_help_shows_groups_and_defaults():
    text = run_cli("swarm.server", "--help", env=clean_env(COLUMNS="200")).stdout
    for group in ("blocks (one of --blocks and --num-blocks):", "swarm and network:", "compute:", "request limits:",
                  "settlement (off unless --settlement is given):"):
        assert f"\n{group}\n" in text, group
    assert "KV cache budget: batch x positions that sessions may hold at once over the span (default: 16384)" in text
    assert "SWARM_INITIAL_PEERS" in text and "--initial_peers" in text  # the environment and the spellings
    assert "--block_indices" not in text  # aliases stay out of the way


def test_console_scripts_are_declared_for_every_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, module in ENTRY_POINTS.items():
        target = scripts[name]
        module_name, _, attr = target.partition(":")
        assert module_name in (module, f"{module}.__main__"), target
        assert callable(getattr(importlib.import_module(module_name), attr))
    # Installed (make installs the project in the venv): named after itself in its usage line.
    script = Path(sys.executable).parent / "swarm-dht"
    if script.exists():
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, env=clean_env())
        assert result.stdout.startswith("usage: swarm-dht "), result.stdout[:200]


def test_parsers_agree_with_what_they_describe():
    """The choices the light parsers spell out equal the runtime definitions they stand for."""
    from swarm.api.__main__ import CODEC_NAMES as API_CODECS
    from swarm.blocks.quantization import QUANTIZATIONS
    from swarm.blocks.weights import DTYPES
    from swarm.chat import CODEC_NAMES as CHAT_CODECS
    from swarm.compression import CODECS
    from swarm.server.__main__ import DTYPE_NAMES, MAX_DECODE_BATCH, QUANTIZATION_NAMES, build_parser
    from swarm.server.handler import Limits

    assert sorted(DTYPE_NAMES) == sorted(DTYPES) and tuple(QUANTIZATION_NAMES) == tuple(QUANTIZATIONS)
    assert sorted(API_CODECS) == sorted(CHAT_CODECS) == sorted(CODECS)
    defaults, limits = build_parser().parse_args(["--blocks", "0:1"]), Limits()
    assert MAX_DECODE_BATCH == limits.max_decode_batch
    assert defaults.max_session_length == limits.max_session_length
    assert defaults.max_batch_tokens == limits.max_batch_tokens
    assert defaults.max_message_mb * 1024**2 == limits.max_message_bytes
    assert defaults.session_timeout == limits.session_timeout


# ---- spellings, environment, the positional model after --initial-peers


def test_petals_spellings_and_the_model_after_initial_peers(monkeypatch):
    from swarm.dht.__main__ import build_parser as dht_parser
    from swarm.server.__main__ import build_parser

    monkeypatch.delenv("SWARM_INITIAL_PEERS", raising=False)
    ours = build_parser().parse_args(["--initial-peers", PEER, "some/model", "--num-blocks", "3", "--dtype",
                                      "bfloat16", "--no-batch-decode", "--cache-tokens=64", "--identity", "k"])
    petals = build_parser().parse_args(["--initial_peers", PEER, "some/model", "--num_blocks", "3", "--torch_dtype",
                                        "bfloat16", "--no_batch_decode", "--attn_cache_tokens=64",
                                        "--identity_path", "k"])
    assert vars(ours) == vars(petals)
    assert ours.model == "some/model" and ours.initial_peers == [PEER] and ours.batch_decode is False
    assert build_parser().parse_args(["--block_indices", "2:4"]).blocks == (2, 4)
    # Every dashed option of every entry point has its underscore spelling (made, not listed by hand).
    for module in MODULES:
        parser = importlib.import_module(f"{module}.__main__" if module != "swarm.chat" else module).build_parser()
        for option in parser._options():
            assert parser._spell(["--" + option[2:].replace("-", "_")]) == [option]
    assert dht_parser().parse_args(["--initial_peers", f"{PEER},{PEER}"]).initial_peers == [PEER, PEER]


def test_initial_peers_and_log_level_from_the_environment(monkeypatch):
    from swarm.chat import build_parser as chat_parser
    from swarm.server.__main__ import build_parser

    monkeypatch.setenv("SWARM_INITIAL_PEERS", f" {PEER}, {PEER}\n")
    monkeypatch.setenv("SWARM_LOG_LEVEL", "debug")
    args = build_parser().parse_args(["--blocks", "0:1"])
    assert args.initial_peers == [PEER, PEER] and args.log_level == "DEBUG"
    assert build_parser().parse_args(["--blocks", "0:1", "--new-swarm"]).initial_peers == []
    assert build_parser().parse_args(["--blocks", "0:1", "--initial-peers"]).initial_peers == []  # explicitly none
    assert build_parser().parse_args(["--blocks", "0:1", "--log-level", "error"]).log_level == "ERROR"
    assert chat_parser().parse_args([]).initial_peers == [PEER, PEER]  # required, given by the environment
    monkeypatch.delenv("SWARM_LOG_LEVEL")
    assert chat_parser().parse_args([]).log_level == "WARNING"  # the chat's own default keeps answers clean


# ---- argument mistakes: one line, exit 2, before anything heavy is loaded


@pytest.mark.parametrize("module, args, fragments", [
    ("swarm.server", ["--bloks", "0:2"], ["unrecognized arguments: --bloks", "did you mean --blocks?"]),
    ("swarm.chat", ["--initial-peers", PEER, "--temprature", "0"], ["did you mean --temperature?"]),
    ("swarm.server", ["--blocks", "0:2", "--initial-peers", "/ip4/127.0.0.1/tcp/notaport"],
     ["'/ip4/127.0.0.1/tcp/notaport' is not a valid multiaddr"]),
    ("swarm.health", ["--initial-peers", "/ip4/127.0.0.1/tcp/31337"], ["lacks the peer id", "/p2p/"]),
    ("swarm.api", [], ["--initial-peers is required", "SWARM_INITIAL_PEERS"]),
    ("swarm.server", ["--blocks", "2-4"], ["argument --blocks: expected START:END, got '2-4'"]),
    ("swarm.dht", ["--port", "70000"], ["argument --port", "0..65535"]),
    ("swarm.dht", ["--host", "example.com"], ["argument --host", "IP address"]),
])
def test_argument_mistakes_are_one_line(module, args, fragments):
    started = time.monotonic()
    assert_one_line_error(run_cli(module, *args), *fragments, code=2)
    assert time.monotonic() - started < 3  # told before torch or hivemind is loaded


def test_a_bad_environment_is_one_line():
    result = run_cli("swarm.dht", env=clean_env(SWARM_INITIAL_PEERS="/ip4/1.2.3.4/tcp/x"))
    assert_one_line_error(result, "SWARM_INITIAL_PEERS: '/ip4/1.2.3.4/tcp/x' is not a valid multiaddr", code=2)
    assert_one_line_error(run_cli("swarm.dht", env=clean_env(SWARM_LOG_LEVEL="loud")), "SWARM_LOG_LEVEL='loud'")


# ---- mistakes found when starting: one line, non-zero


@pytest.mark.parametrize("model, fragment", [
    ("/no/such/model", "no such model directory: /no/such/model"),
    ("someone/no-such-model", "'someone/no-such-model' is not a local directory and the hub is offline"),
    ("pyproject.toml", "is a file"),
])
def test_unknown_models_are_one_line(model, fragment):
    env = clean_env(HF_HUB_OFFLINE="1")
    model = str(REPO / model) if model == "pyproject.toml" else model
    assert_one_line_error(run_cli("swarm.server", model, "--blocks", "0:2", env=env), fragment, code=1)
    assert_one_line_error(run_cli("swarm.chat", model, "--initial-peers", PEER, env=env), fragment, code=1)


def test_blocks_outside_the_model_are_one_line(tiny_model):
    path = tiny_model("llama")  # 6 blocks
    result = run_cli("swarm.server", str(path), "--blocks", "0:99", "--host", "127.0.0.1", timeout=180)
    assert_one_line_error(result, "--blocks 0:99 is outside the model's 0:6", code=1)


def test_a_port_in_use_is_refused_by_servers_and_bootstrap_nodes(launcher, tiny_model):
    dht = launcher.start_dht()  # a real p2pd listening on the port (with SO_REUSEPORT)
    port = dht.maddr.split("/tcp/")[1].split("/")[0]
    second = run_cli("swarm.dht", "--host", "127.0.0.1", "--port", port)
    assert_one_line_error(second, f"port {port} is in use", code=1)
    server = run_cli("swarm.server", str(tiny_model("llama")), "--blocks", "0:2", "--host", "127.0.0.1", "--port",
                     port)
    assert_one_line_error(server, f"port {port} is in use", code=1)
    assert dht.proc.poll() is None  # the first node is unharmed


def test_the_real_swarm_with_petals_spellings_and_the_environment(launcher, tiny_model, tmp_path, monkeypatch):
    """A server started as a Petals user would type it (the model after --initial_peers, --block_indices, quiet
    logging), then clients: one finding the swarm through SWARM_INITIAL_PEERS, one with no swarm at all."""
    import torch

    from swarm import AutoDistributedModelForCausalLM
    from swarm.utils.errors import UserError

    path = tiny_model("llama")
    dht = launcher.start_dht()
    server = start_process(launcher, ["-m", "swarm.server", "--host", "127.0.0.1", "--initial_peers", dht.maddr,
                                      str(path), "--block_indices", "0:6", "--throughput", "1", "--log_level",
                                      "warning"], SERVER_READY, "server-petals-spelling")
    log = server.output()
    assert "blocks 0:6 of tiny-llama" in log, log
    assert " INFO " not in log, log  # --log_level warning

    monkeypatch.setenv("SWARM_INITIAL_PEERS", dht.maddr)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, torch_dtype="float32")
    try:
        assert model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2).shape == (1, 5)
    finally:
        model.shutdown()

    monkeypatch.delenv("SWARM_INITIAL_PEERS")
    started = time.monotonic()
    with pytest.raises(UserError, match="no swarm to join: pass initial_peers=.* or set SWARM_INITIAL_PEERS"):
        AutoDistributedModelForCausalLM.from_pretrained(path)
    with pytest.raises(UserError, match="initial_peers: '/ip4/1.2.3.4/tcp/x' is not a valid multiaddr"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=["/ip4/1.2.3.4/tcp/x"])
    assert time.monotonic() - started < 5  # refused before loading anything


def test_ctrl_c_before_start_exits_quietly(tiny_model, launcher):
    """A Ctrl-C while a server is still loading: exit status 130, no traceback."""
    import signal

    # A fresh interpreter (fork=False): a fork of the pre-imported zygote has no loading phase to interrupt.
    process = SwarmProcess(["-m", "swarm.server", str(tiny_model("llama")), "--blocks", "0:2", "--host",
                            "127.0.0.1"], launcher.directory / "ctrl-c.log", SERVER_READY, fork=False)
    launcher.processes.append(process)  # stopped with the others whatever happens
    # Arguments parsed, torch loading (it is imported only after parsing): the server's own signal handlers are
    # not installed yet. A fixed sleep was too short on a busy machine, where the Ctrl-C came before main().
    deadline = time.monotonic() + 60
    while not any("libtorch" in m.path for m in psutil.Process(process.proc.pid).memory_maps()):
        assert time.monotonic() < deadline and process.proc.poll() is None, process.output()
        time.sleep(0.05)
    os.kill(process.proc.pid, signal.SIGINT)
    assert process.proc.wait(60) in (130, 0), process.output()  # 0: it was quicker, and stopped cleanly
    assert "Traceback" not in process.output(), process.output()
