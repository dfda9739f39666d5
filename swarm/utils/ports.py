"""Whether a TCP port can be listened on, checked before a libp2p daemon is started on it."""

from __future__ import annotations

import errno
import ipaddress
import socket

from swarm.utils.errors import UserError


class PortInUse(UserError, OSError):
    """The TCP port a node was told to listen on is taken."""


def check_can_listen(host: str, port: int) -> None:
    """Raise a ``UserError`` (``PortInUse`` for a taken port) if a node could not listen on ``host:port``.

    Checked before the daemon starts because p2pd binds with SO_REUSEPORT: beside another p2pd it starts anyway,
    sharing the port, and only fails later in confusing ways (e.g. "failed to connect to bootstrap peers")."""
    host = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR only: a port left in TIME_WAIT by a node that just stopped is free, a listening one is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} is in use on {host} (another server or DHT node?): choose another "
                                f"--port, or --port 0 for any free one") from None
            if e.errno == errno.EACCES:
                raise UserError(f"port {port} needs privileges on this machine: choose a port above 1023, or "
                                f"--port 0 for any free one") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"cannot listen on {host}: no interface of this machine has that address (0.0.0.0: "
                                f"every interface)") from None
            raise
