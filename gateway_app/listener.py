"""Listening sockets, bound before a server starts: a busy port is then one clear line, not a traceback."""

from __future__ import annotations

import socket


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), for uvicorn to listen on.

    Binding before uvicorn starts lets the caller report a busy port in one line of its own, and know the
    port before the first request. Raises OSError (e.g. EADDRINUSE) as it is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
