"""hivemind's UPX-packed p2pd and its decompressed copy (swarm/dht/p2pd.py): the copy runs the same program, daemons
start from it, and whatever cannot be decompressed starts as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hivemind.hivemind_cli
import psutil
import pytest

from swarm.dht import p2pd
from swarm.dht.node import start_dht, stop_dht
from swarm.utils.loop_thread import LoopThread

PACKED = Path(hivemind.hivemind_cli.__file__).parent / "p2pd"
linux_x86_64 = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                  reason="the copy is made on Linux x86-64 only (elsewhere the packed daemon runs)")


def unpack(out: Path) -> None:
    """As daemon_program does it: in a process of its own (a forked child of a process with threads is no place to
    trace from)."""
    subprocess.run([sys.executable, "-m", "swarm.dht.p2pd", str(PACKED), str(out)], check=True, timeout=120)


def usage(program: Path | str) -> str:
    done = subprocess.run([str(program), "-help"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@linux_x86_64
def test_the_copy_is_the_decompressed_program(tmp_path):
    assert b"UPX!" in PACKED.read_bytes()[:4096]  # else this test would check nothing
    copy = tmp_path / "p2pd"
    unpack(copy)
    data = copy.read_bytes()
    assert data[:4] == b"\x7fELF" and b"UPX!" not in data[:4096]
    assert len(data) > 2 * PACKED.stat().st_size  # decompressed
    # the same program: the same flags, described alike (the name of the program aside)
    assert usage(copy).replace(str(copy), "P") == usage(PACKED).replace(str(PACKED), "P")
    again = tmp_path / "again"
    unpack(again)
    assert again.read_bytes() == data  # nothing of the traced run's own state ends up in it


@linux_x86_64
def test_daemons_start_from_the_copy_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    monkeypatch.setattr(p2pd, "_chosen", {})
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    loop = LoopThread()
    try:
        first = loop.run(start_dht([], host="127.0.0.1"))
        maddrs = [f"{maddr}/p2p/{first[0].peer_id}" for maddr in loop.run(first[0].get_visible_maddrs())]
        second = loop.run(start_dht(maddrs, host="127.0.0.1", client_mode=True))
        daemons = [child for child in me.children() if child.pid not in before and child.name() == "p2pd"]
        copies = list(tmp_path.glob("p2pd/*/p2pd"))
        assert len(copies) == 1 and len(daemons) == 2
        assert {daemon.exe() for daemon in daemons} == {str(copies[0])}
        # they work: the second joined the first's swarm
        assert first[0].peer_id in [peer.peer_id for peer in loop.run(second[0].list_peers())]
        assert second[0].peer_id in [peer.peer_id for peer in loop.run(first[0].list_peers())]
        loop.run(stop_dht(*second))
        loop.run(stop_dht(*first))
    finally:
        loop.stop()


@linux_x86_64
def test_what_cannot_be_decompressed_starts_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(p2pd, "_chosen", {})
    plain = tmp_path / "p2pd"  # not UPX-packed: nothing to decompress
    plain.write_text("#!/bin/sh\necho -hostAddrs\n")
    plain.chmod(0o755)
    assert p2pd.daemon_program(str(plain)) == str(plain)
    assert not (tmp_path / "cache").exists()

    fake = tmp_path / "fake" / "p2pd"  # claims to be packed, but is no program: the copy fails, once
    fake.parent.mkdir()
    fake.write_bytes(b"\x7fELF" + b"UPX!" * 100)
    fake.chmod(0o755)
    assert p2pd.daemon_program(str(fake)) == str(fake)
    failed = list((tmp_path / "cache").glob("p2pd/*/failed"))
    assert len(failed) == 1 and not list((tmp_path / "cache").glob("p2pd/*/p2pd*"))  # no partial copy left
    monkeypatch.setattr(p2pd, "_chosen", {})  # a new process: it does not try again
    monkeypatch.setattr(p2pd.subprocess, "run", lambda *a, **k: pytest.fail("tried to decompress again"))
    assert p2pd.daemon_program(str(fake)) == str(fake)
