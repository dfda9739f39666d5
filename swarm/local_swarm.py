"""Start a swarm of real processes on 127.0.0.1 (bootstrap node, servers) and end them by PID.

Used by the demo, the benchmarks and the tests. Each process gets its own session (process group); its p2pd daemon
runs in a group of its own (so that a terminal's Ctrl-C leaves it to the server), and ``signal`` reaches it too.

Being in sessions of their own, the processes get none of the signals meant for the script that started them, and
SIGTERM's or SIGHUP's default action ends Python without running ``finally`` blocks or ``with`` exits: ``timeout``
or a closed terminal would leave the whole swarm running. So while a :class:`LocalSwarm` is open, those two signals
raise :class:`Terminated` in the main thread instead, everything unwinds and every swarm's processes are stopped.
Start every process a script needs through a ``LocalSwarm`` (``start_process`` takes any ``python`` command line) so
that it is stopped too.

``python -m swarm.X`` processes are forks of one process that has imported torch, transformers, diffusers and
hivemind once (swarm/utils/preloaded.py): a server is ready in about a second instead of after 6-10 s of imports.
On an emulated host the fork joins the host's network namespace. ``SwarmProcess(..., fork=False)`` gets a fresh
interpreter (through ``ip netns exec`` on an emulated host).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.utils import preloaded
from swarm.utils.multiaddrs import peer_id_of

if TYPE_CHECKING:
    from swarm.server.in_process import InProcessServer
    from swarm.utils.emulated_hosts import Host

SERVER_READY = "Join this swarm with: --initial-peers "
DHT_READY = "--initial-peers "
PROXY_READY = "WAN proxy ready: "
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """A SIGTERM or SIGHUP received while a :class:`LocalSwarm` was open, raised in the main thread so that the
    script unwinds and stops its processes; uncaught, Python exits with status 128 + the signal's number, as a
    shell reports a process ended by that signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class _Signals:
    """The process-wide state of the handler: how many swarms are open, the handlers it replaced, and a signal that
    arrived while raising had to wait (a process being started, or processes being stopped)."""

    open_swarms = 0
    replaced: dict[int, object] = {}
    held = 0
    pending: int | None = None


def _on_terminating_signal(signum: int, frame: object) -> None:
    if _Signals.held:
        _Signals.pending = signum
        return
    raise Terminated(signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # Python runs handlers in the main thread only, and only it may install them
    if _Signals.open_swarms == 0:
        for sig in TERMINATING_SIGNALS:
            # Only over the default action: an ignored SIGHUP (nohup) stays ignored, a program's own handler stays.
            if signal.getsignal(sig) == signal.SIG_DFL:
                _Signals.replaced[sig] = signal.signal(sig, _on_terminating_signal)
    _Signals.open_swarms += 1


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    _Signals.open_swarms -= 1
    if _Signals.open_swarms == 0:
        for sig, previous in _Signals.replaced.items():
            signal.signal(sig, previous)
        _Signals.replaced = {}


@contextlib.contextmanager
def _signals_held(deliver: bool = True) -> Iterator[None]:
    """Delay a terminating signal until the block is over: raised between a process's start and its being
    recorded, it would orphan that process; raised while processes are being stopped, it would cut that short.
    ``deliver=False``: a signal that arrived meanwhile is dropped (a ``Terminated`` is already on its way)."""
    _Signals.held += 1
    try:
        yield
    finally:
        _Signals.held -= 1
    if _Signals.held == 0 and _Signals.pending is not None:
        signum, _Signals.pending = _Signals.pending, None
        if deliver:
            raise Terminated(signum)


class SwarmProcess:
    """A ``python -m swarm.server`` / ``python -m swarm.dht`` process writing to a log file; ``fork``: a fork of the
    pre-imported zygote where the command is ``-m swarm.*`` (see the module docstring)."""

    def __init__(self, args: list[str], log_path: Path, ready_marker: str, env: dict[str, str] | None = None,
                 on: Host | None = None, fork: bool = True):
        self.args, self.log_path, self.ready_marker = args, log_path, ready_marker
        self.log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | preloaded.PreloadedProcess
        if fork and preloaded.available() and args[:1] == ["-m"] and args[1].startswith("swarm."):
            self.proc = preloaded.start(args[1], args[2:], log_path, env, netns=on.namespace if on else None)
        else:
            command = [sys.executable, *args]  # on an emulated host, `ip netns exec` execs python: the PID is python's
            self.proc = subprocess.Popen(on.command(command) if on else command, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.maddr: str | None = None

    def wait_ready(self, timeout: float = 300) -> SwarmProcess:
        if self.maddr is None:
            self.maddr = self.wait_for(self.ready_marker, timeout)
        return self

    def wait_for(self, marker: str, timeout: float) -> str:
        """The first word after ``marker`` in the log, waiting up to ``timeout`` seconds for it to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if marker in line:
                    return line.split(marker, 1)[1].split()[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.args)} exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"{' '.join(self.args)} not ready in {timeout} s:\n{self.output()}")

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.maddr)

    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group and to its p2pd daemons: a SIGKILL is then a machine going down, not
        a server process dying while its daemon lingers for a second or two."""
        daemons = self._children()
        for kill, pid in [(os.killpg, self.proc.pid), *[(os.kill, child) for child in daemons]]:
            try:
                kill(pid, sig)
            except ProcessLookupError:
                pass

    def _children(self) -> list[int]:
        pids = []
        for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):  # Linux; elsewhere: none found
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in children.read_text().split()]
        return pids

    def terminate(self) -> None:
        """SIGTERM to the process alone: a server announces itself offline through its p2pd, then stops both."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        """``terminate``, wait up to ``timeout`` seconds, then SIGKILL whatever is left of the process group."""
        if self.log.closed:
            return  # stopped already: its pid may belong to another process by now
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


class LocalSwarm:
    """``with LocalSwarm() as swarm: swarm.start_server(...)``: every process is stopped on exit, also when the
    script gets SIGTERM or SIGHUP (see the module docstring)."""

    def __init__(self, directory: str | Path | None = None):
        # Logs go to ``directory``, kept; or to a temporary one, removed after a clean exit and kept (and named on
        # stderr) after an error, where they help.
        self.own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="swarm-logs-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processes: list[SwarmProcess] = []
        self.in_process: list[InProcessServer] = []

    def __enter__(self) -> LocalSwarm:
        _install_handlers()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            running = sum(process.proc.poll() is None for process in self.processes)
            if isinstance(exc, Terminated) and running:
                print(f"{signal.Signals(exc.signum).name}: stopping the {running} processes of the local swarm...",
                      file=sys.stderr, flush=True)
            # A signal during the stop is not lost, unless the swarm is stopping because of one already.
            with _signals_held(deliver=not isinstance(exc, Terminated)):
                self.stop_all()
        finally:
            _restore_handlers()
        if self.own_directory:
            if exc is None:
                shutil.rmtree(self.directory, ignore_errors=True)
            else:
                print(f"The local swarm's logs are in {self.directory}", file=sys.stderr, flush=True)

    def start_dht(self, *extra: str, on: Host | None = None) -> SwarmProcess:
        """``python -m swarm.dht`` on 127.0.0.1, or on emulated host ``on`` (listening on its address)."""
        args = ["-m", "swarm.dht", "--host", on.address if on else "127.0.0.1", *extra]
        return self._start(args, DHT_READY, f"dht-{on.name}" if on else "dht", on=on).wait_ready()

    def start_server(self, model: str | os.PathLike | None, blocks: str | None, initial_peers: list[str], *extra: str,
                     wait: bool = True, env: dict[str, str] | None = None, on: Host | None = None) -> SwarmProcess:
        """``python -m swarm.server [model] --blocks ... --host 127.0.0.1``; ``model=None``: the embedded one;
        ``blocks=None``: pass ``--num-blocks N`` in ``extra``; ``on``: on that emulated host, on its address."""
        name = (f"server-{blocks.replace(':', '-')}" if blocks else "server-auto") + (f"-{on.name}" if on else "")
        args = _server_args(model, blocks, initial_peers, extra, host=on.address if on else "127.0.0.1")
        process = self._start(["-m", "swarm.server", *args], SERVER_READY, name, env, on=on)
        return process.wait_ready() if wait else process

    def start_server_in_process(self, model: str | os.PathLike | None, blocks: str | None, initial_peers: list[str],
                                *extra: str, wait: bool = True) -> InProcessServer:
        """The same server as :meth:`start_server`, on a thread of this process (see swarm/server/in_process.py):
        no Python start-up, but no signals or SIGKILL either. Stopped with the processes."""
        from swarm.server.in_process import InProcessServer

        with _signals_held():
            server = InProcessServer(_server_args(model, blocks, initial_peers, extra))
            self.in_process.append(server)
        return server.wait_ready() if wait else server

    def start_halves(self, model: str | os.PathLike | None, *extra: str,
                     in_process: bool = False) -> list[SwarmProcess | InProcessServer]:
        """Two servers splitting ``model``'s blocks in half (a diffusers pipeline's: its U-Net's levels, so 0:1 and
        1:3 for the tiny ones), the second joining the first; ``in_process``: on threads of this process."""
        from swarm.blocks.span import load_config
        from swarm.hub.source import resolve_model
        from swarm.hub.tiny_diffusion import unet_levels

        source = resolve_model(model)
        num_blocks = unet_levels(model) if source.is_diffusers_layout() else load_config(source).num_hidden_layers
        start = self.start_server_in_process if in_process else self.start_server
        first = start(model, f"0:{num_blocks // 2}", [], *extra)
        return [first, start(model, f"{num_blocks // 2}:{num_blocks}", [first.maddr], *extra)]

    def start_wan_proxy(self, target_port: int, listen_port: int, rtt_ms: float,
                        mbit: float | None) -> SwarmProcess:
        """A ``swarm.utils.wan_proxy`` in front of ``target_port`` (see there)."""
        args = ["-m", "swarm.utils.wan_proxy", "--listen-port", str(listen_port), "--target-port", str(target_port),
                "--rtt-ms", str(rtt_ms)] + (["--mbit", str(mbit)] if mbit else [])
        return self._start(args, PROXY_READY, f"proxy-{listen_port}").wait_ready()

    def _start(self, args: list[str], marker: str, name: str, env: dict[str, str] | None = None,
               on: Host | None = None) -> SwarmProcess:
        with _signals_held():
            process = SwarmProcess(args, self.directory / f"{len(self.processes)}-{name}.log", marker, env, on)
            self.processes.append(process)
        return process

    def stop_all(self, timeout: float = 15) -> None:
        """SIGTERM to every process at once (and the same to in-process servers), then wait for each (SIGKILL after
        ``timeout`` seconds in all)."""
        with _signals_held():
            for process in [*self.in_process, *self.processes]:
                process.terminate()
            deadline = time.monotonic() + timeout
            for process in [*self.in_process, *self.processes]:
                process.stop(max(0.0, deadline - time.monotonic()))


def _server_args(model: str | os.PathLike | None, blocks: str | None, initial_peers: list[str],
                 extra: tuple[str, ...], host: str = "127.0.0.1") -> list[str]:
    """``swarm.server``'s arguments for a server of ``model`` (None: the embedded one) on ``blocks``, listening on
    ``host``."""
    args = ([str(model)] if model else []) + ["--host", host] + (["--blocks", blocks] if blocks else [])
    return args + (["--initial-peers", *initial_peers] if initial_peers else []) + list(extra)


def peers_or_local_swarm(stack: contextlib.ExitStack, model: str | os.PathLike | None,
                         initial_peers: list[str], in_process: bool = False,
                         server_args: Sequence[str] = ()) -> list[str]:
    """``initial_peers`` if given; otherwise start, inside ``stack``, a local swarm of two servers that split the
    model's blocks in half (a diffusers pipeline's: its U-Net's levels), and return its address (for examples that
    also run stand-alone). ``in_process``: the servers run on threads of this process (see
    :meth:`LocalSwarm.start_server_in_process`), which saves each one's Python start-up. ``server_args``: more
    options for both servers."""
    if initial_peers:
        return list(initial_peers)
    first, _ = stack.enter_context(LocalSwarm()).start_halves(model, *server_args, in_process=in_process)
    return [first.maddr]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's range of ephemeral ports: one
    from that range, free when checked, can be handed to any process that binds port 0 (every p2pd does) before the
    caller binds it (a gateway lost its port that way on a loaded test run)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default start
    chooser = random.SystemRandom()  # not the random module's state, which tests may seed alike in each process
    for _ in range(100):
        port = chooser.randrange(max(1024, ephemeral // 2), ephemeral)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range below is full: an ephemeral one, as before
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(swarm: LocalSwarm, args: list[str], ready_marker: str, name: str,
                  timeout: float = 300, on: Host | None = None) -> SwarmProcess:
    """``python ARGS`` as one of ``swarm``'s processes (its own process group and log file, stopped with the
    others), on emulated host ``on`` if given; returns once ``ready_marker`` appears in its output (e.g. an API
    gateway, a chat)."""
    return swarm._start(args, ready_marker, name, on=on).wait_ready(timeout)
