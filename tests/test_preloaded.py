"""Processes forked from the pre-imported zygote (swarm/utils/preloaded.py) behave as ``python -m MODULE`` would:
arguments, environment, working directory, unbuffered output, a session of their own, exit statuses, signals, and
reaping; and a local swarm's servers started this way serve as fresh ones do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from swarm.utils import preloaded

# a thread count other than the zygote's (the tests' own setting: conftest.py), which a fork must apply itself
FORK_THREADS = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"

PROBE = '''
import json, os, sys, time
import torch
print("threads", torch.get_num_threads())
print("argv", json.dumps(sys.argv[1:]))
print("env", os.environ.get("PROBE_VALUE"), "leak", os.environ.get("PROBE_LEAK"))
print("cwd", os.getcwd())
print("name", __name__, "session", os.getsid(0) == os.getpid())
print("stdin", repr(sys.stdin.read()))
print("ready")  # no flush: output must not wait for the process to end
mode = sys.argv[1]
if mode == "sleep":
    time.sleep(600)
elif mode == "exit":
    sys.exit(int(sys.argv[2]))
elif mode == "raise":
    raise ValueError("the probe fails")
elif mode == "message":
    sys.exit("a message from the probe")
elif mode == "interrupt":
    raise KeyboardInterrupt
'''


def light(preload: str = "") -> dict[str, str]:
    """The environment for a script whose zygote imports only ``preload`` (comma-separated): these tests' forks
    need no torch."""
    return {**os.environ, preloaded.PRELOAD_VARIABLE: preload}


@pytest.fixture
def probe(tmp_path: Path):
    """Start ``python -m probe_module MODE ...`` forked from the zygote, in ``tmp_path``; yields a starter."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    started: list[preloaded.PreloadedProcess] = []

    def start(*args: str) -> tuple[preloaded.PreloadedProcess, Path]:
        log = tmp_path / f"probe-{len(started)}.log"
        log.write_text("")
        env = {**os.environ, "PROBE_VALUE": "given", "OMP_NUM_THREADS": FORK_THREADS}
        env.pop("PROBE_LEAK", None)
        process = preloaded.start("probe_module", list(args), log, env=env, cwd=str(tmp_path))
        started.append(process)
        return process, log

    os.environ["PROBE_LEAK"] = "from the parent"  # set after the zygote may have started: must not be seen
    try:
        yield start
    finally:
        del os.environ["PROBE_LEAK"]
        for process in started:
            process.kill()
            process.wait(10)


def wait_for_line(log: Path, line: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert time.monotonic() < deadline, f"no {line!r} in:\n{log.read_text()}"
        time.sleep(0.05)
    return log.read_text()


def test_a_fork_gets_its_arguments_environment_directory_and_session(probe, tmp_path):
    process, log = probe("sleep", "two words", "--flag")
    output = wait_for_line(log, "ready")  # while it runs: its output is unbuffered
    assert 'argv ["sleep", "two words", "--flag"]' in output
    assert "env given leak None" in output
    assert f"cwd {tmp_path}" in output
    assert "name __main__ session True" in output
    assert "stdin ''" in output
    assert f"threads {FORK_THREADS}" in output  # its own OMP_NUM_THREADS, though torch was loaded before it existed
    assert process.poll() is None and os.getpgid(process.pid) == process.pid
    assert psutil.Process(process.pid).name() == "probe_module"


@pytest.mark.parametrize(("args", "status", "printed"), [
    (("exit", "0"), 0, None),
    (("exit", "3"), 3, None),
    (("raise",), 1, "ValueError: the probe fails"),
    (("message",), 1, "a message from the probe"),
    (("interrupt",), -signal.SIGINT, "KeyboardInterrupt"),
])
def test_exit_statuses_are_pythons(probe, args, status, printed):
    process, log = probe(*args)
    assert process.wait(60) == status == process.returncode
    assert "ready" in log.read_text()
    if printed:
        assert printed in log.read_text()


def test_signals_reach_the_fork_and_it_is_reaped_at_once(probe):
    process, log = probe("sleep")
    wait_for_line(log, "ready")
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: Python's own handler, no longer the zygote's
    assert process.wait(30) == -signal.SIGINT
    assert "KeyboardInterrupt" in log.read_text()

    process, log = probe("sleep")
    wait_for_line(log, "ready")
    process.kill()
    assert process.wait(30) == -signal.SIGKILL
    with pytest.raises(psutil.NoSuchProcess):  # reaped, not a zombie left for a test to mistake for a live one
        psutil.Process(process.pid).status()
    process.kill()  # a no-op once ended: its PID may belong to someone else by now


def test_the_zygote_ends_with_its_parent_and_its_forks_live_on(tmp_path):
    """A script that started a fork exits: its zygote goes at once, the fork (in its own session) does not."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    log, cwd = str(tmp_path / "log"), str(tmp_path)
    script = ("from pathlib import Path; from swarm.utils import preloaded\n"
              f"p = preloaded.start('probe_module', ['sleep'], Path({log!r}), cwd={cwd!r})\n"
              "print(p.pid, flush=True)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=light())
    fork_pid = int(parent.stdout.readline())
    fork = psutil.Process(fork_pid)
    zygote = fork.parent()
    try:
        assert "swarm.utils.preloaded" in " ".join(zygote.cmdline())
        # it imported what SWARM_ZYGOTE_PRELOAD named (nothing), not torch
        assert not any("libtorch" in region.path for region in zygote.memory_maps())
        assert parent.wait(60) == 0
        zygote.wait(15)  # raises psutil.TimeoutExpired if the zygote outlived its parent
        assert fork.is_running()
    finally:
        parent.stdout.close()
        fork.kill()
        _, alive = psutil.wait_procs([fork], timeout=15)
        assert not alive


def test_a_group_sigterm_to_a_script_still_stops_its_forks(tmp_path):
    """``timeout`` and a closed terminal signal the script's whole process group: the zygote, in a session of its
    own, is not hit, so the script's LocalSwarm can still stop its forks (a bootstrap node here)."""
    script = ("import time; from swarm.local_swarm import LocalSwarm\n"
              f"with LocalSwarm({str(tmp_path)!r}) as swarm:\n"
              "    print(swarm.start_dht().proc.pid, flush=True)\n"
              "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True, env=light("swarm.dht.node"))
    fork = None
    try:
        fork = psutil.Process(int(parent.stdout.readline()))
        assert fork.name() == "swarm.dht"
        os.killpg(parent.pid, signal.SIGTERM)
        assert parent.wait(60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs([fork], timeout=15)
        assert not alive, "the bootstrap node outlived its script"
    finally:
        parent.stdout.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if fork is not None and fork.is_running():
            fork.kill()


SCRIPT = '''
import os, sys
from pathlib import Path
import psutil
from swarm.utils import preloaded
print("argv", sys.argv[1:], "path", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "name", __name__)
print("to stderr", file=sys.stderr)
child = preloaded.start("probe_module", ["sleep"], Path(sys.argv[1]))
print("sibling", psutil.Process(child.pid).ppid() == os.getppid())
child.kill()
print("child", child.wait(60))
sys.exit(5)
'''


def test_a_forked_script_has_its_own_streams_and_its_forks_are_the_same_zygotes(tmp_path):
    """``preloaded.run`` runs a script as ``subprocess.run`` would (stdout and stderr apart, argv, sys.path, exit
    status); a fork it starts comes from the zygote that forked the script, not from a new one of its own."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    (tmp_path / "script.py").write_text(SCRIPT)
    result = preloaded.run([str(tmp_path / "script.py"), str(tmp_path / "log")], timeout=120, cwd=str(tmp_path))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "argv ['" + str(tmp_path / "log") + "'] path True name __main__" in result.stdout
    assert result.stderr.strip().endswith("to stderr") and "to stderr" not in result.stdout
    assert "sibling True" in result.stdout and f"child {-signal.SIGKILL}" in result.stdout


def test_a_forked_process_on_a_terminal_gets_ctrl_c_typed_there(tmp_path):
    """A pty's path as stdin makes it the fork's controlling terminal: Ctrl-C typed into it interrupts the fork."""
    import pty
    import select

    (tmp_path / "probe_module.py").write_text(PROBE.replace('print("stdin", repr(sys.stdin.read()))',
                                                            'print("tty", sys.stdin.isatty())'))
    master, slave = pty.openpty()
    terminal = Path(os.ttyname(slave))
    # our end of the terminal stays open until the fork has opened it: a pty with no end open reads as EIO
    process = preloaded.popen(["-m", "probe_module", "sleep"], terminal, stdin=terminal, cwd=str(tmp_path))
    try:
        output, deadline = b"", time.monotonic() + 60
        while b"ready" not in output:
            assert time.monotonic() < deadline and process.poll() is None, output
            if select.select([master], [], [], 1)[0]:
                output += os.read(master, 4096)
        assert b"tty True" in output
        os.close(slave)
        slave = -1
        os.write(master, b"\x03")
        assert process.wait(30) == -signal.SIGINT
    finally:
        process.kill()
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_a_fork_on_an_emulated_host_is_in_its_network_namespace(tmp_path):
    """``netns``: the fork joins the namespace (as ``ip netns exec`` would), and so does what it starts."""
    from swarm.utils.emulated_hosts import EmulatedNetwork, unavailable

    if (reason := unavailable(home_hosts=False)) is not None:
        pytest.skip(reason)
    (tmp_path / "script.py").write_text(
        "import os, subprocess\nprint(os.readlink('/proc/self/ns/net'))\n"
        "print(subprocess.run(['readlink', '/proc/self/ns/net'], capture_output=True, text=True).stdout.strip())\n")
    with EmulatedNetwork() as net:
        host = net.public_host("probe")
        inside = host.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
        log = tmp_path / "log"
        process = preloaded.popen([str(tmp_path / "script.py")], log, netns=host.namespace)
        assert process.wait(60) == 0, log.read_text()
    assert log.read_text().split() == [inside, inside] and inside != os.readlink("/proc/self/ns/net")


def test_a_forked_script_whose_zygote_ended_forks_from_its_own(tmp_path):
    """A forked script that starts a fork after the zygote it came from has ended (its starter stopped it) gets
    one from a zygote of its own instead of an error."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    (tmp_path / "script.py").write_text(
        "import sys, time\nfrom pathlib import Path\nfrom swarm.utils import preloaded\n"
        "preloaded.start('probe_module', ['exit', '0'], Path(sys.argv[1])).wait(60)\n"  # through the first zygote
        "print('asked', flush=True)\n"
        "while not Path(sys.argv[2]).exists():\n    time.sleep(0.05)\n"
        "child = preloaded.start('probe_module', ['exit', '7'], Path(sys.argv[1]))\n"
        "print('second', child.wait(60), flush=True)\n")
    log, stopped, out = tmp_path / "log", tmp_path / "stopped", tmp_path / "out"
    starter = ("import sys\nfrom pathlib import Path\nfrom swarm.utils import preloaded\n"
               f"p = preloaded.popen([{str(tmp_path / 'script.py')!r}, {str(log)!r}, {str(stopped)!r}], "
               f"Path({str(out)!r}), cwd={str(tmp_path)!r})\n"
               f"while 'asked' not in (Path({str(out)!r}).read_text() if Path({str(out)!r}).exists() else ''):\n"
               "    import time; time.sleep(0.05)\n"
               "preloaded.stop()\n"
               f"Path({str(stopped)!r}).touch()\n"
               "print(p.pid, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=180, env=light())
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    try:
        deadline = time.monotonic() + 120
        while "second" not in out.read_text():
            assert time.monotonic() < deadline and psutil.pid_exists(pid), out.read_text()
            time.sleep(0.1)
        assert "second 7" in out.read_text(), out.read_text()
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            script = psutil.Process(pid)
            if script.name() == "script.py":
                script.kill()
