"""Start ``python -m swarm.MODULE ARGS`` (or ``python SCRIPT ARGS``) as a fork of one process that has imported
torch, transformers, diffusers and hivemind already (a "zygote"), instead of as a fresh interpreter.

Each fresh ``python -m swarm.server`` spends 6-10 s of CPU importing those libraries before it reads its first
argument: a local swarm of a bootstrap node and two servers spent more time importing than serving, and the test
suite, which starts a hundred such processes, spent most of its time there. A fork starts at once and shares the
imported code's memory with its siblings. From then on the process is what ``python -m`` would make: a session
(process group) of its own, stdout and stderr in its log file, unbuffered, the environment and working directory
it was started with, ``__main__`` run by :mod:`runpy`, and the exit status ``subprocess`` would report (a number,
or minus the signal that ended it).

What the imported libraries read from the environment while they load (OpenMP's settings, hub paths) comes from
the zygote's environment, the parent's when it first started one; a fork's own ``OMP_NUM_THREADS`` is applied.

The zygote imports modules and nothing else: it runs no torch operation (so it holds no OpenMP threads a fork would
lose) and starts no Python thread. It is this process's child, talks over its stdin and stdout (one JSON line per
request), reaps its forks as they end, and exits when this process closes its stdin, by :func:`stop` or by ending.
Its forks reach it too, over a Unix socket named in their ``SWARM_ZYGOTE``: a forked script that starts a local
swarm has its servers forked by the same zygote (as siblings) instead of paying for a zygote of its own.
Python's ``multiprocessing`` fork server is not used because each of its children re-imports the parent's
``__main__`` script, which re-runs scripts that lack a ``__main__`` guard.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# What the zygote imports once: the heavy imports of every ``swarm.*`` command (torch, transformers and hivemind
# through the server; diffusers through the U-Net levels).
PRELOAD = ("swarm.server.server", "swarm.blocks.unet", "swarm.dht.node")
# Set in the starting process's environment, this replaces PRELOAD (comma-separated; empty: none), for programs
# whose forks need less (a bootstrap node needs neither transformers nor diffusers).
PRELOAD_VARIABLE = "SWARM_ZYGOTE_PRELOAD"
POLL_INTERVAL = 0.05
SOCKET_VARIABLE = "SWARM_ZYGOTE"  # in a fork's environment: the zygote's socket, for forks that start forks


class _Zygote:
    """This process's end of the zygote: a child process and a lock around its request-reply pipe."""

    def __init__(self) -> None:
        # A session of its own: a signal for this process's group (`timeout`'s SIGTERM, a closed terminal's SIGHUP)
        # must leave the zygote to answer while this process stops the forks; it ends when this process does.
        self.proc = subprocess.Popen([sys.executable, "-c", "from swarm.utils.preloaded import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ),
                                     cwd=os.getcwd(), start_new_session=True)
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: dict) -> dict:
        with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except (BrokenPipeError, ValueError):
                line = b""
            if not line:
                raise RuntimeError(f"the process that forks swarm processes ended ({self.proc.poll()})")
            return json.loads(line)

    def stop(self) -> None:
        with self.lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


class _Connection:
    """A fork's way to the zygote that forked it: requests and replies as on the zygote's stdin and stdout, over its
    Unix socket. Stopping it closes the connection only: the zygote is its starter's."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def ask(self, request: dict) -> dict:
        with self.lock:
            try:
                self.sock.sendall(json.dumps(request).encode() + b"\n")
                line = self.file.readline()
            except OSError:
                line = b""
            if not line:
                self.closed = True
                raise RuntimeError("the process that forks swarm processes ended")
            return json.loads(line)

    def stop(self) -> None:
        with self.lock:
            self.closed = True
            self.file.close()
            self.sock.close()


_zygote: _Zygote | _Connection | None = None
_zygote_lock = threading.Lock()


def _the_zygote() -> _Zygote | _Connection:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = None
            path = os.environ.get(SOCKET_VARIABLE)
            if path:  # this process is a fork: its zygote forks for it too, unless it has ended
                with contextlib.suppress(OSError):
                    _zygote = _Connection(path)
            if _zygote is None:
                _zygote = _Zygote()
            atexit.register(_zygote.stop)
        return _zygote


def stop() -> None:
    """End the zygote (if one runs), waiting for it: the processes it forked live on, each in its own session."""
    global _zygote
    with _zygote_lock:
        if _zygote is not None:
            _zygote.stop()
            _zygote = None


def available() -> bool:
    """Whether processes can be forked this way here (POSIX, where ``os.fork`` exists)."""
    return hasattr(os, "fork")


class PreloadedProcess:
    """A forked ``python ARGV`` process, with the part of :class:`subprocess.Popen`'s interface that a local swarm
    uses: ``args``, ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate`` and ``kill``."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, stdout: Path, stderr: Path | None = None,
                 stdin: Path | None = None, netns: str | None = None):
        self.args = list(argv)
        self._zygote = _the_zygote()
        spec = {"argv": self.args, "env": env, "cwd": cwd, "stdin": None if stdin is None else str(stdin),
                "stdout": str(stdout), "stderr": str(stdout if stderr is None else stderr), "netns": netns}
        try:
            self.pid: int = self._zygote.ask({"start": spec})["pid"]
        except RuntimeError:
            if not isinstance(self._zygote, _Connection):
                raise
            # the zygote that forked this process has ended: this process's own one forks instead
            self._zygote = _the_zygote()
            self.pid = self._zygote.ask({"start": spec})["pid"]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self._zygote.ask({"poll": self.pid})["returncode"]
            except RuntimeError:  # the zygote was killed: its forks are init's now, and their statuses lost
                if not _exists(self.pid):
                    self.returncode = -signal.SIGKILL  # unknown; reported as killed rather than as a clean exit
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(POLL_INTERVAL)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet, so the PID is still this process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: str | None = None, netns: str | None = None) -> PreloadedProcess:
    """``python -m MODULE ARGS``, forked from the zygote (started on first use), in a session of its own, writing
    stdout and stderr to ``log_path`` (appending), with environment ``env`` (default: this process's) and working
    directory ``cwd`` (default: this process's); in network namespace ``netns`` if given (see :func:`popen`)."""
    return popen(["-m", module, *args], log_path, env=env, cwd=cwd, netns=netns)


def popen(argv: list[str], stdout: Path, stderr: Path | None = None, stdin: Path | None = None,
          env: dict[str, str] | None = None, cwd: str | None = None, netns: str | None = None) -> PreloadedProcess:
    """``python ARGV`` (``["-m", MODULE, ...]`` or ``[SCRIPT, ...]``), forked from the zygote, in a session of its
    own: stdout and stderr appended to files (the same one when ``stderr`` is None), stdin read from ``stdin``
    (default: nothing). A terminal's path (a pty's ``os.ttyname``) for ``stdin`` becomes the process's controlling
    terminal, so that Ctrl-C typed there reaches it. ``netns``: the name of a network namespace (``ip netns``) the
    fork joins before it runs, as ``ip netns exec NAME python ...`` would (root only)."""
    return PreloadedProcess(list(argv), dict(os.environ if env is None else env), cwd or os.getcwd(), stdout, stderr,
                            stdin, netns)


def run(argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *ARGV], capture_output=True, text=True, timeout=..., check=...)``, forked
    from the zygote. On a timeout the process (its session) is killed and ``subprocess.TimeoutExpired`` raised."""
    with tempfile.TemporaryDirectory(prefix="swarm-run-") as directory:
        out, err = Path(directory) / "stdout", Path(directory) / "stderr"
        process = popen(argv, out, err, env=env, cwd=cwd)
        try:
            code = process.wait(timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its session: whatever it started in its group goes too
            process.wait()
            raise
        result = subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(errors="backslashreplace"),
                                             err.read_text(errors="backslashreplace"))
    if check:
        result.check_returncode()
    return result


# --- the zygote's side ---

def serve() -> None:
    """The zygote's main loop: import :data:`PRELOAD`, then answer requests on stdin, and on a Unix socket for its
    forks, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the script that started it
    chosen = os.environ.get(PRELOAD_VARIABLE)
    for module in PRELOAD if chosen is None else [name.strip() for name in chosen.split(",") if name.strip()]:
        __import__(module)
    directory = tempfile.mkdtemp(prefix="swarm-zygote-")
    path = os.path.join(directory, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    try:
        _serve(listener, path)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(directory)


def _serve(listener: socket.socket, path: str) -> None:
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wakeup pipe
    ended: dict[int, int] = {}
    pending: dict[int, bytes] = {stdin: b""}  # per connection (stdin's and each socket's): bytes short of a line
    connections: dict[int, socket.socket] = {}

    def reply(fd: int, message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        if fd == stdin:
            stdout.write(data)
            stdout.flush()
        else:
            with contextlib.suppress(OSError):
                connections[fd].sendall(data)

    while True:
        ready, _, _ = select.select([stdin, wake_r, listener, *connections], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap(ended)
        if listener in ready:
            connection, _ = listener.accept()
            connections[connection.fileno()] = connection
            pending[connection.fileno()] = b""
        for fd in [fd for fd in ready if fd in pending]:
            chunk = os.read(fd, 65536) if fd == stdin else connections[fd].recv(65536)
            if not chunk:
                if fd == stdin:
                    return
                connections.pop(fd).close()
                del pending[fd]
                continue
            pending[fd] += chunk
            while b"\n" in pending[fd]:
                line, pending[fd] = pending[fd].split(b"\n", 1)
                request = json.loads(line)
                if "start" in request:
                    pid = os.fork()
                    if pid == 0:  # the fork: it must never return into this loop
                        code = 1
                        try:
                            for kept in (wake_r, wake_w):
                                os.close(kept)
                            listener.close()
                            for connection in connections.values():
                                connection.close()
                            code = _run(request["start"], path)
                        finally:
                            os._exit(code)
                    # an unpolled fork that ended earlier may have had this PID: its status is not this one's
                    ended.pop(pid, None)
                    reply(fd, {"pid": pid})
                else:
                    _reap(ended)
                    reply(fd, {"returncode": ended.pop(request["poll"], None)})


def _reap(ended: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        ended[pid] = os.waitstatus_to_exitcode(status)


def _run(spec: dict, socket_path: str) -> int:
    """In the fork: become what ``python ARGV`` would be, run it, and return its exit status. SIGINT stays ignored
    (as in the zygote) until the module or script runs, where Python's own handler takes over."""
    argv, env, cwd = spec["argv"], spec["env"], spec["cwd"]
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    if spec.get("netns"):
        _join_network_namespace(spec["netns"])
    module = argv[1] if argv[0] == "-m" else None
    _name_process(module or os.path.basename(argv[0]))
    opened: dict[str, int] = {}
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        target = spec[name] or os.devnull
        if target not in opened:
            # A terminal opened by a session leader without O_NOCTTY becomes its controlling terminal (Linux).
            flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_APPEND | os.O_CREAT
            opened[target] = os.open(target, os.O_RDWR if _is_terminal(target) else flags, 0o644)
        os.dup2(opened[target], fd)
    for kept in opened.values():
        if kept > 2:
            os.close(kept)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        # Unbuffered, as PYTHONUNBUFFERED=1 makes them: a log is read while the process runs. A stream some import
        # kept (a logging handler's) writes to the same descriptor and now flushes at each line.
        kept = getattr(sys, name)
        if kept is not None:
            kept.reconfigure(line_buffering=True)
        fresh = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                 write_through=True)
        setattr(sys, name, fresh)
        setattr(sys, f"__{name}__", fresh)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads != os.environ.get("OMP_NUM_THREADS", "") and threads.isdigit() and int(threads) > 0:
        # OpenMP read the zygote's environment when torch loaded it: a fork's own thread count is set here.
        import torch

        torch.set_num_threads(int(threads))
    os.environ.clear()
    os.environ.update(env)
    os.environ[SOCKET_VARIABLE] = socket_path
    os.chdir(cwd)
    if module is None:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as for `python SCRIPT`
    else:
        sys.argv = [module, *argv[2:]]
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if module is None:
            runpy.run_path(argv[0], run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = _exit_status(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        # Python ends on an uncaught Ctrl-C by the signal itself, so that its parent sees it killed by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001  # printed and reported as Python does
        traceback.print_exc()
        code = 1
    _finish()
    return code


def _join_network_namespace(name: str) -> None:
    """Move this (single-threaded) fork into ``ip netns``'s namespace ``name``: its sockets, and those of the
    processes it starts (p2pd), are that host's from now on."""
    descriptor = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(descriptor, 0x40000000) != 0:  # CLONE_NEWNET
            error = ctypes.get_errno()
            raise OSError(error, f"cannot join network namespace {name}: {os.strerror(error)}")
    finally:
        os.close(descriptor)


def _is_terminal(path: str) -> bool:
    return path.startswith("/dev/pts/") or path.startswith("/dev/tty")


def _name_process(module: str) -> None:
    """Name the fork after its module (what ``ps -e`` and ``psutil``'s ``name()`` show; its command line stays
    the zygote's)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, module.encode()[:15], 0, 0, 0)  # PR_SET_NAME; Linux only, elsewhere the name stays python


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` gives a process."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish() -> None:
    """What the interpreter does at exit: wait for non-daemon threads, run ``atexit`` functions, flush."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own first step at exit
    except Exception:  # noqa: BLE001  # exit anyway
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
