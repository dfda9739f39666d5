"""hivemind's libp2p daemon, started from a decompressed copy of its binary.

hivemind ships ``p2pd`` packed with UPX: each start first decompresses ~28 MB of program into private memory, about
0.09 of the ~0.35 CPU-s a daemon spends in its first second (measured: 0.31-0.38 packed, 0.23-0.27 decompressed).
Every server, client process and DHT node starts one; the test suite starts ~340.

So the first start on a machine writes the decompressed program to the cache directory, and later starts exec it:
the packed binary runs under ptrace until its own code begins (Go's runtime makes its first ``arch_prctl``, to set
up thread-local storage, before it has written to its initialized data), and its loadable segments, decompressed
in memory by then, are written out at their file offsets as an ELF file that runs the same program. The copy is
checked to start before it is used. Anything unusual (not Linux x86-64, a binary that is not UPX-packed, ptrace not
allowed, a copy that does not run) falls back to the packed binary, which is never modified.

``python -m swarm.dht.p2pd PACKED OUT`` makes the copy; it runs in a process of its own, since tracing a forked
child from a process with other threads (a server's, a client's) is unsafe.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

from swarm.utils.cache import cache_path

logger = logging.getLogger(__name__)

UNPACK_TIMEOUT = 60.0  # s; it takes ~0.5 s
_PT_LOAD, _PF_X = 1, 1
_ARCH_PRCTL = 158  # x86-64 syscall number
_TRACEME, _GETREGS, _SYSCALL = 0, 12, 24
_ORIG_RAX, _RIP = 15, 16  # in struct user_regs_struct (27 unsigned longs)
_chosen: dict[str, str] = {}  # packed path -> what this process execs


def daemon_program(packed: str) -> str:
    """The path to exec for hivemind's ``packed`` p2pd: its decompressed copy in the cache directory (made on first
    use, once per machine), or ``packed`` itself where no copy can be made."""
    if packed not in _chosen:
        try:
            _chosen[packed] = str(_unpacked_copy(Path(packed)) or packed)
        except Exception as e:  # a cache we cannot write, a failed copy: the packed daemon works, only slower
            logger.debug(f"starting the packed p2pd ({e!r})")
            _chosen[packed] = packed
    return _chosen[packed]


def _unpacked_copy(packed: Path) -> Path | None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    with open(packed, "rb") as file:
        if b"UPX!" not in file.read(4096):
            return None
    stat = packed.stat()
    directory = cache_path("p2pd", f"{stat.st_size}-{stat.st_mtime_ns}")
    copy = directory / "p2pd"  # the same name: the daemon's process is still called p2pd
    if copy.exists():
        return copy
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:  # one maker per machine; processes starting at once wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if copy.exists():
            return copy
        if (directory / "failed").exists():  # tried on this machine already: not again at every start
            return None
        partial = directory / f"p2pd.{os.getpid()}.partial"
        try:
            subprocess.run([sys.executable, "-m", "swarm.dht.p2pd", str(packed), str(partial)], check=True,
                           capture_output=True, timeout=UNPACK_TIMEOUT)
            usage = subprocess.run([str(partial), "-help"], capture_output=True, text=True, timeout=UNPACK_TIMEOUT)
            if "-hostAddrs" not in usage.stdout + usage.stderr:
                raise RuntimeError(f"the copy does not run: {usage.stdout[-300:]}{usage.stderr[-300:]}")
            os.replace(partial, copy)
        except Exception as e:
            (directory / "failed").write_text(f"{e!r}\n")
            raise
        finally:
            partial.unlink(missing_ok=True)
    return copy


def unpack(packed: str, out: str) -> None:
    """Write the program that UPX-packed ``packed`` decompresses itself into (see the module's docstring)."""
    with open(packed, "rb") as file:
        header = file.read(4096)
    # The packed file's first segment is the space its program is decompressed into (it starts with that
    # program's ELF header).
    base = min(vaddr for kind, _, _, vaddr, _, _ in _program_headers(header) if kind == _PT_LOAD)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    pid = os.fork()
    if pid == 0:  # stops at its exec, for us to trace
        try:
            libc.ptrace(_TRACEME, 0, None, None)
            os.execv(packed, [packed, "-help"])
        finally:
            os._exit(127)
    try:
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"the packed daemon did not stop at its start: status {status}")
        registers = (ctypes.c_ulonglong * 27)()
        for _ in range(100_000):  # syscall entries and exits; the decompressor makes a few dozen
            if libc.ptrace(_SYSCALL, pid, None, None) != 0:
                raise OSError(ctypes.get_errno(), "ptrace")
            _, status = os.waitpid(pid, 0)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"the packed daemon ended before its program began: status {status}")
            if libc.ptrace(_GETREGS, pid, None, ctypes.byref(registers)) != 0:
                raise OSError(ctypes.get_errno(), "ptrace")
            if registers[_ORIG_RAX] == _ARCH_PRCTL:
                break
        else:
            raise RuntimeError("the packed daemon's program never began")
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            def read(address: int, size: int) -> bytes:
                memory.seek(address)
                return memory.read(size)

            elf = read(base, 64)
            if elf[:4] != b"\x7fELF" or elf[4] != 2:
                raise RuntimeError(f"no 64-bit ELF header at {base:#x} once decompressed")
            phoff, = struct.unpack_from("<Q", elf, 32)
            entry_size, count = struct.unpack_from("<HH", elf, 54)
            # the first segment maps the file from its start: header and program headers lie as in the file
            headers = _program_headers(read(base, phoff + entry_size * count))
            loads = [h for h in headers if h[0] == _PT_LOAD]
            rip = registers[_RIP]
            if not any(flags & _PF_X and vaddr <= rip < vaddr + size for _, flags, _, vaddr, size, _ in loads):
                raise RuntimeError(f"arch_prctl made at {rip:#x}, outside the decompressed program")
            image = bytearray(max(offset + size for _, _, offset, _, size, _ in loads))
            for _, _, offset, vaddr, size, _ in loads:
                image[offset:offset + size] = read(vaddr, size)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    struct.pack_into("<Q", image, 40, 0)  # no section headers: they are not loaded, so not in memory
    struct.pack_into("<HHH", image, 58, 0, 0, 0)
    with open(out, "wb") as file:
        file.write(image)
    os.chmod(out, 0o755)


def _program_headers(data: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """(type, flags, offset, vaddr, filesz, memsz) of each program header of the ELF64 file that starts ``data``."""
    phoff, = struct.unpack_from("<Q", data, 32)
    entry_size, count = struct.unpack_from("<HH", data, 54)
    headers = []
    for i in range(count):
        kind, flags, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * entry_size)
        headers.append((kind, flags, offset, vaddr, filesz, memsz))
    return headers


if __name__ == "__main__":
    unpack(sys.argv[1], sys.argv[2])
