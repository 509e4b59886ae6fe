"""The connection to the engines: one long-lived aiohttp session and the header rules both ways."""

from __future__ import annotations

import aiohttp

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway recomputes are never relayed.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Accept-Encoding is dropped because answers are relayed without decoding: the gateway must be able
# to read `usage` in them. Authorization and X-API-Key are the client's credentials for the gateway.
_NOT_TO_ENGINE = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"content-type",
    b"expect",
    b"accept-encoding",
    b"authorization",
    b"x-api-key",
    b"x-request-id",  # replaced by the gateway's (the client's own when it was usable)
}
_NOT_TO_CLIENT = _HOP_BY_HOP | {b"content-length", b"date", b"server", b"x-request-id"}


def create_session() -> aiohttp.ClientSession:
    """One pooled session per process, created inside the running loop at start-up."""
    connector = aiohttp.TCPConnector(
        limit=0,  # no pool-wide cap: per-engine concurrency is the engine's business
        ttl_dns_cache=10,  # Service DNS names rarely change; re-resolve often enough to follow them
        # Engines (uvicorn) close idle connections after 5 s; giving ours up sooner avoids sending a
        # request on a connection the engine is closing at that very moment.
        keepalive_timeout=4,
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
    skip = _NOT_TO_ENGINE
    for name, value in client_headers:
        if name == b"connection":  # headers the client named in Connection are hop-by-hop too
            skip = skip | {token.strip().lower() for token in value.split(b",")}
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in client_headers if name not in skip]
    headers.append(("Content-Type", "application/json"))
    if extra:
        overridden = {name.lower() for name, _ in extra}
        headers = [(n, v) for n, v in headers if n.lower() not in overridden]
        headers.extend(extra)
    return headers


def headers_for_client(engine_headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The engine's response headers minus hop-by-hop ones (names lower-cased, as ASGI wants)."""
    lowered = [(name.lower(), value) for name, value in engine_headers]
    skip = _NOT_TO_CLIENT
    for name, value in lowered:
        if name == b"connection":
            skip = skip | {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in lowered if name not in skip]


def is_event_stream(content_type: str | None) -> bool:
    """Whether an answer's Content-Type is SSE's, parameters and case aside (what aiohttp's
    `ClientResponse.content_type` tells, without parsing every answer's header into a message object)."""
    return content_type is not None and content_type.partition(";")[0].strip().lower() == "text/event-stream"


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body if it has at most `cap` bytes, else None (having read no more than `cap` + 1).

    For the answers the gateway must look inside: an engine that announces or sends more costs the
    gateway at most `cap` bytes, never the whole of what it sends.
    """
    if response.content_length is not None and response.content_length > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await response.content.read(cap + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    return None
