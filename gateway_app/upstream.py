"""The connection to the engines: one long-lived aiohttp session and the header rules both ways."""

from __future__ import annotations

import aiohttp

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway recomputes are never relayed.
_HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)
_NOT_TO_ENGINE = _HOP_BY_HOP | {b"host", b"content-length", b"content-type", b"expect"}
_NOT_TO_CLIENT = _HOP_BY_HOP | {b"content-length", b"date", b"server"}


def create_session() -> aiohttp.ClientSession:
    """One pooled session per process, created inside the running loop at start-up."""
    connector = aiohttp.TCPConnector(
        limit=0,  # no pool-wide cap: per-engine concurrency is the engine's business
        ttl_dns_cache=10,  # Service DNS names rarely change; re-resolve often enough to follow them
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),  # per-request timeouts are set by the proxy
        auto_decompress=False,  # relay bytes exactly as the engine sent them
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


def headers_for_engine(
    client_headers: list[tuple[bytes, bytes]], extra: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, plus the engine's configured headers."""
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in client_headers
        if name not in _NOT_TO_ENGINE
    ]
    headers.append(("Content-Type", "application/json"))
    if extra:
        overridden = {name.lower() for name, _ in extra}
        headers = [(n, v) for n, v in headers if n.lower() not in overridden]
        headers.extend(extra)
    return headers


def headers_for_client(engine_headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The engine's response headers minus hop-by-hop ones (names lower-cased, as ASGI wants)."""
    relayed = []
    for name, value in engine_headers:
        lowered = name.lower()
        if lowered not in _NOT_TO_CLIENT:
            relayed.append((lowered, value))
    return relayed
